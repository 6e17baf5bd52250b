"""``memoized``: ``functools.lru_cache`` for eager calls, the plain function under ``torch.compile``.

Dynamo ignores an ``lru_cache`` wrapper, traces the function inside, and warns about it once per
call site; the values these caches hold (plans, grids, bounds) are constants the compiled graph
folds anyway, so under compilation the function is called directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["memoized"]

F = TypeVar("F", bound=Callable)


def memoized(maxsize: int) -> Callable[[F], F]:
    def wrap(function: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(function)

        @functools.wraps(function)
        def call(*args):
            return function(*args) if torch.compiler.is_compiling() else cached(*args)

        call.cache_clear = cached.cache_clear
        call.cache_info = cached.cache_info
        return call

    return wrap
