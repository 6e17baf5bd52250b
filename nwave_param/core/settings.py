"""A registration's settings, and what each thread computes with.

:class:`RegistrationSettings` is the frozen configuration the constraints of one
:func:`~nwave_param.register` call share (spec, penalty strengths, hardness); a change is a new
object, swapped whole into their :class:`Registration`.  A forward of the registered model reads
the settings once, at its start (:class:`PinSettings`), so that it computes every weight with
one hardness; ``per_thread`` holds, for each thread, those pinned settings and its open
:class:`~nwave_param.core.passes.Pass` es, so that nothing one thread does reaches another's
forward.
"""

from __future__ import annotations

import math
import numbers
import threading
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from nwave_param.spec import ChipSpec

__all__ = [
    "PinSettings",
    "Registration",
    "RegistrationSettings",
    "check_hardness",
    "check_scale",
    "OpenPass",
    "open_pass",
    "per_thread",
    "pin",
    "settings_in_effect",
    "unpin",
]


def check_scale(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_hardness(value: object) -> float:
    """``value`` as a float in [0, 1]; TypeError for a bool or non-number, ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"hardness must be a real number in [0, 1], got {value!r} ({type(value).__name__})")
    if not 0 <= value <= 1:  # NaN fails too
        raise ValueError(f"hardness must be in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RegistrationSettings:
    """One registration's configuration: frozen, so a change is a new object (see :class:`Registration`).

    Args:
        spec: the chip.
        alpha: the magnitude penalty's strength, a finite number >= 0.
        lam: the topology penalty's strength, a finite number >= 0.
        power: the magnitude penalty's exponent, 1 or 2.
        hardness: how far the network computes with what the chip holds, in [0, 1].

    Raises:
        TypeError: ``spec`` is not a :class:`~nwave_param.ChipSpec`, or ``hardness`` not a real number.
        ValueError: ``alpha`` or ``lam`` is not a finite number >= 0, ``power`` not 1 or 2, or
            ``hardness`` not in [0, 1].
    """

    spec: ChipSpec
    alpha: float = 1.0
    lam: float = 1.0
    power: int = 2
    hardness: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ChipSpec):
            raise TypeError(f"spec must be a ChipSpec, got {type(self.spec).__name__}")
        object.__setattr__(self, "alpha", check_scale("alpha", self.alpha))
        object.__setattr__(self, "lam", check_scale("lam", self.lam))
        if isinstance(self.power, bool) or self.power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {self.power!r}")
        object.__setattr__(self, "power", int(self.power))
        object.__setattr__(self, "hardness", check_hardness(self.hardness))


class Registration:
    """What the constraints of one :func:`~nwave_param.register` call share.

    ``settings`` is replaced whole, by one assignment (:meth:`replace_settings`), so a reader in
    another thread sees every constraint with the old settings or every one with the new, never
    a mix; and a forward of the registered model reads them once, at its start
    (:class:`PinSettings`), so that it computes every weight with one hardness.  ``on_chip`` is
    whether a :meth:`Registry.on_chip <nwave_param.Registry.on_chip>` context holds the model; the
    lock makes entering one a single step.  A copy of the model gets a registration of its own.
    """

    def __init__(self, settings: RegistrationSettings) -> None:
        self.settings = settings
        self.on_chip = False
        self.lock = threading.Lock()

    def replace_settings(self, settings: RegistrationSettings) -> None:
        """Swap the settings; this thread's open pass (if any) recomputes at its next read."""
        self.settings = settings
        current = open_pass(self)
        if current is not None:
            current.reset()

    def __deepcopy__(self, memo: dict) -> Registration:
        return Registration(self.settings)  # a copy is never on a chip (see ChipConstraint.__getstate__)

    def __getstate__(self) -> dict:
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"])

    def __repr__(self) -> str:
        return f"Registration({self.settings})"


# What each thread computes with: the settings pinned by the forward it is in, and its open
# passes.  Per thread, so that a harden() or a cached() pass in one thread never reaches
# another thread's forward.
per_thread = threading.local()


def settings_in_effect(registration: Registration) -> RegistrationSettings:
    """The settings this thread computes with: those its running forward of the registered model
    started with (:class:`PinSettings`), else the registration's own."""
    if not torch.compiler.is_compiling():  # a compiled graph holds its settings as constants already
        pinned = getattr(per_thread, "pinned", None)
        if pinned:
            held = pinned.get(registration)
            if held is not None:
                return held[0]
    return registration.settings


class OpenPass(Protocol):
    """What settings need of an open pass (a :class:`nwave_param.core.passes.Pass`, which
    builds on this module): to compute again after a change of settings."""

    def reset(self) -> None: ...


def open_pass(registration: Registration) -> OpenPass | None:
    """This thread's open pass of ``registration``, if any (a :class:`~nwave_param.core.passes.Pass`)."""
    passes = getattr(per_thread, "passes", None)
    return passes.get(registration) if passes else None


class PinSettings:
    """A forward pre-hook and forward hook (always called) on the registered model: its forward
    computes every weight with the settings it started with.  A ``harden()`` from another thread
    takes effect at that thread's next forward, never in the middle of one.  Nested forwards of
    the same model keep the outermost one's settings."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration

    def before(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        pinned = per_thread.__dict__.setdefault("pinned", {})
        held = pinned.get(self.registration)
        if held is None:
            pinned[self.registration] = [self.registration.settings, 1]
        else:
            held[1] += 1

    def after(self, module: nn.Module, args: tuple, output: object) -> None:
        if torch.compiler.is_compiling():
            return
        pinned = getattr(per_thread, "pinned", {})
        held = pinned.get(self.registration)
        if held is not None:
            held[1] -= 1
            if not held[1]:
                del pinned[self.registration]


def pin(model: nn.Module, registration: Registration) -> None:
    """Add :class:`PinSettings`'s hooks to ``model``, the model given to ``register``."""
    hooks = PinSettings(registration)
    model.register_forward_pre_hook(hooks.before)
    model.register_forward_hook(hooks.after, always_call=True)


def unpin(model: nn.Module) -> None:
    """Remove every :class:`PinSettings` hook from ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), PinSettings)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)
