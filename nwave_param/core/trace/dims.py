"""How an op maps the dims of its operands: which dim of an op's result is which dim of its input
(views, picks, reductions), and the example's batch and time dims."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

__all__ = [
    "CREATES",
    "IGNORED",
    "PICKS",
    "REDUCTIONS",
    "VIEWS",
    "aligned_dims",
    "argument",
    "composed",
    "example_dims",
    "positive_dim",
    "through_pick",
    "through_view",
]


def example_dims(example: Tensor, dims: str | None) -> str:
    """How the example's dims are read, one letter each: ``t`` time, ``b`` batch, any other
    letter a channel dim.  By default snnTorch's time-first convention: a 3-D example is
    ``"tbc"`` (time, batch, channels), a 2-D one ``"bc"``, a 1-D one ``"c"``, a 4-D one
    ``"bccc"`` (a batch of images), a 5-D one ``"tbccc"`` (time, batch, channels, height, width,
    as snnTorch and tonic give event frames).

    Raises:
        ValueError: ``dims`` gives not one letter per dim, or more than one ``b`` or ``t``.
    """
    if dims is None:
        return {0: "", 1: "c", 2: "bc", 3: "tbc", 5: "tbccc"}.get(example.dim(), "b" + "c" * (example.dim() - 1))
    if not isinstance(dims, str) or len(dims) != example.dim() or dims.count("b") > 1 or dims.count("t") > 1:
        raise ValueError(
            f"dims={dims!r} does not read an example of shape {tuple(example.shape)}: give one letter per dim, "
            "'t' time, 'b' batch, 'c' a channel dim (e.g. dims='btc')"
        )
    return dims


_SAME = {  # ops whose result has its first operand's dims, in order
    "contiguous", "clone", "detach", "detach_", "to", "float", "double", "half", "bfloat16", "type", "cpu", "cuda",
    "requires_grad_", "data", "type_as", "resolve_conj", "resolve_neg",
}


VIEWS = _SAME | {
    "t", "t_", "T", "mT", "mH", "adjoint", "transpose", "transpose_", "swapaxes", "swapdims", "permute", "movedim",
    "moveaxis", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "expand", "expand_as", "broadcast_to", "view",
    "reshape", "view_as", "reshape_as", "flatten", "unflatten", "ravel",
}


# ops that move or pick elements: their channels are read by running them on an index probe
PICKS = {
    "__getitem__", "select", "narrow", "index_select", "gather", "take_along_dim", "flip", "roll", "cat", "concat",
    "concatenate", "stack", "split", "chunk", "tensor_split", "unsafe_chunk", "split_with_sizes", "unsafe_split",
    "unbind", "repeat", "repeat_interleave", "tile",
}


REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "logsumexp", "std", "var", "nansum", "nanmean"}


CREATES = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}


IGNORED = {"shape", "size", "dim", "numel", "device", "dtype", "is_contiguous", "stride", "grad_fn", "requires_grad", "grad", "is_leaf"}


def argument(args: Sequence, kwargs: Mapping, position: int, name: str, default: object = None) -> object:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else default


def positive_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _regrouped(before: Sequence[int], after: Sequence[int]) -> tuple:
    """A reshape from ``before`` to ``after``: each new dim's old dim where exactly one old dim
    of the same size becomes exactly one new dim (dims of size 1 on both sides pair up in order:
    a batch of 1 stays the batch); None where dims merge or split, or a dim of size 1 is new."""
    result: list = [None] * len(after)
    i = j = 0
    while i < len(before) and j < len(after):
        if before[i] == 1 or after[j] == 1:  # a dim of size 1: kept, dropped or new
            if before[i] == 1 and after[j] == 1:
                result[j] = i
            i, j = i + (before[i] == 1), j + (after[j] == 1)
            continue
        i0, j0, a, b = i, j, before[i], after[j]
        i, j = i + 1, j + 1
        while a != b and (i < len(before) or j < len(after)):
            if (a < b and i < len(before)) or j >= len(after):
                a, i = a * before[i], i + 1
            else:
                b, j = b * after[j], j + 1
        if i - i0 == 1 and j - j0 == 1:
            result[j0] = i0
    return tuple(result)


def aligned_dims(source: Tensor, out: Tensor) -> tuple | None:
    """Broadcasting: each dim of ``out``'s dim in ``source``, aligned from the right (None where
    ``source`` has none, or stretches a dim of size 1)."""
    if source.dim() > out.dim():
        return None
    offset = out.dim() - source.dim()
    return (None,) * offset + tuple(d if source.shape[d] == out.shape[offset + d] else None for d in range(source.dim()))


def _moved(source: int | Sequence[int], destination: int | Sequence[int], rank: int) -> tuple:
    sources = [positive_dim(d, rank) for d in ([source] if isinstance(source, int) else source)]
    destinations = [positive_dim(d, rank) for d in ([destination] if isinstance(destination, int) else destination)]
    order: list = [None] * rank
    for s, d in zip(sources, destinations):
        order[d] = s
    rest = iter(d for d in range(rank) if d not in sources)
    return tuple(next(rest) if o is None else o for o in order)


def through_view(name: str, args: Sequence, kwargs: Mapping, source: Tensor, out: Tensor) -> tuple | None:
    """For the view or shape op ``name`` taking ``source`` (its first operand) to ``out``: each
    dim of ``out``'s dim in ``source`` (None for a new or merged one)."""
    rank = source.dim()
    if name in _SAME:
        return tuple(range(rank)) if out.dim() == rank else None
    if name in ("t", "t_"):
        return (1, 0) if rank == 2 else tuple(range(rank))
    if name == "T":
        return tuple(reversed(range(rank)))
    if name in ("mT", "mH", "adjoint"):
        return (*range(rank - 2), rank - 1, rank - 2)
    if name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        order = list(range(rank))
        a, b = positive_dim(argument(args, kwargs, 1, "dim0"), rank), positive_dim(argument(args, kwargs, 2, "dim1"), rank)
        order[a], order[b] = order[b], order[a]
        return tuple(order)
    if name == "permute":
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs["dims"]
        return tuple(positive_dim(d, rank) for d in order)
    if name in ("movedim", "moveaxis"):
        return _moved(argument(args, kwargs, 1, "source"), argument(args, kwargs, 2, "destination"), rank)
    if name in ("unsqueeze", "unsqueeze_"):
        dim = argument(args, kwargs, 1, "dim")
        order: list = list(range(rank))
        order.insert(dim + rank + 1 if dim < 0 else dim, None)
        return tuple(order)
    if name in ("squeeze", "squeeze_"):
        dim = argument(args, kwargs, 1, "dim")
        dims = range(rank) if dim is None else [dim] if isinstance(dim, int) else dim
        gone = {positive_dim(d, rank) for d in dims if source.shape[positive_dim(d, rank)] == 1}
        return tuple(d for d in range(rank) if d not in gone)
    if name in ("expand", "expand_as", "broadcast_to"):
        return aligned_dims(source, out)
    return _regrouped(tuple(source.shape), tuple(out.shape))  # view, reshape, flatten, unflatten, ravel


def through_pick(name: str, args: Sequence, kwargs: Mapping, source: Tensor, out: Tensor) -> tuple | None:
    """For an op that picks or moves ``source``'s elements: each dim of ``out``'s dim in
    ``source`` where the dims correspond (ranks equal, or one dim gone or added)."""
    if name in ("select", "unbind"):
        gone = positive_dim(argument(args, kwargs, 1, "dim", 0), source.dim())
        return tuple(d for d in range(source.dim()) if d != gone)
    if name == "stack":
        dim = positive_dim(argument(args, kwargs, 1, "dim", 0), out.dim())
        order: list = list(range(source.dim()))
        order.insert(dim, None)
        return tuple(order)
    if name == "__getitem__":
        return _indexed(args[1], source.dim())
    return tuple(range(source.dim())) if out.dim() == source.dim() else None


def _indexed(index: object, rank: int) -> tuple | None:
    """``tensor[index]``: each result dim's dim (None for a new one); None for an index that gathers."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(item, (Tensor, list)) for item in items):
        return None
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    result: list = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            result += range(dim, dim + rank - used)
            dim += rank - used
        elif item is None:
            result.append(None)
        elif isinstance(item, slice):
            result.append(dim)
            dim += 1
        else:  # an integer: the dim goes
            dim += 1
    return tuple(result) + tuple(range(dim, rank))


def composed(dims: tuple, through: tuple) -> tuple:
    return tuple(dims[m] if m is not None and m < len(dims) else None for m in through)
