"""Tensors that share memory in a checkpoint: telling them apart, and giving them new values.

``torch.save`` keeps what shares storage in memory: a weight tied between two keys, a view of
another tensor.  :func:`view_of` tells a tied weight from an equal copy, :func:`memory_sharing`
finds a tensor whose own elements share memory (expanded), and :func:`with_values` writes new
values into a checkpoint so that every tie and view survives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["memory_sharing", "overlap", "same_bits", "storage_of", "view_of", "with_values"]


def view_of(tensor: Tensor) -> tuple:
    """Equal for keys holding the very same tensor (a tied weight); unique otherwise."""
    where = storage_of(tensor)
    if where is None:
        return (id(tensor),)
    return (where, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)


def storage_of(tensor: Tensor) -> tuple | None:
    """What identifies the memory ``tensor`` lives in; None for memory nothing else can share."""
    if tensor.layout != torch.strided or tensor.is_meta:  # a meta tensor holds no memory to share
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor without plain storage shares none
        return None
    return (storage.device, storage.data_ptr()) if storage.nbytes() else None


def memory_sharing(value: Tensor) -> str | None:
    """How the elements of ``value`` share memory, said for an error; None when each has its own.

    Each has its own when, taking the dims by increasing stride, every stride reaches past all
    the elements the smaller ones span: true of every view slicing, transposing and reshaping
    make; an expanded tensor (stride 0) or an unfolded one breaks it, and an as_strided one may.
    """
    if value.numel() == 0 or value.is_contiguous():  # the common case, in one call: a weight is read per element
        return None
    shape, strides = tuple(value.shape), value.stride()
    expanded = [d for d, (size, step) in enumerate(zip(shape, strides)) if step == 0 and size > 1]
    if expanded:
        d = expanded[0]
        return f"is an expanded tensor of shape {shape} (stride 0 along dim {d}: one stored value read {shape[d]} times)"
    span = 0
    for step, size in sorted((step, size) for step, size in zip(strides, shape) if size > 1):
        if step <= span:
            return (
                f"is stored with strides {strides} for its shape {shape}, under which its elements may share memory "
                "(an unfold or as_strided view)"
            )
        span += step * (size - 1)
    return None


_EXACT = 1 << 24  # elements up to which two interleaved views are compared element by element


def _byte_span(tensor: Tensor) -> tuple[int, int]:
    """``[first, end)``: the bytes of its storage ``tensor`` reads (strides are never negative)."""
    first = tensor.storage_offset() * tensor.element_size()
    last = first + sum((size - 1) * step for size, step in zip(tensor.shape, tensor.stride())) * tensor.element_size()
    return first, last + tensor.element_size()


def _dense(tensor: Tensor) -> bool:
    """Whether ``tensor``'s elements fill every byte of its span (a permuted contiguous tensor)."""
    first, end = _byte_span(tensor)
    return end - first == tensor.numel() * tensor.element_size() and memory_sharing(tensor) is None


def overlap(a: Tensor, b: Tensor) -> bool:
    """Whether an element of ``a`` and an element of ``b`` share a byte of memory.

    Two slices of one flat storage (cuDNN's flattened RNN weights) share a storage without
    overlapping; two views of one tensor, or a tensor and its transpose, overlap.  Interleaved
    views (``base[:, ::2]`` and ``base[:, 1::2]``) are compared element by element up to
    ``2**24`` elements, and said to overlap beyond that (a refusal, never a missed overlap)."""
    if a.numel() == 0 or b.numel() == 0 or storage_of(a) is None or storage_of(a) != storage_of(b):
        return False
    (a_first, a_end), (b_first, b_end) = _byte_span(a), _byte_span(b)
    first, end = max(a_first, b_first), min(a_end, b_end)
    if first >= end:
        return False
    if (_dense(a) and _dense(b)) or a.numel() + b.numel() > _EXACT:
        return True
    taken = torch.zeros(end - first, dtype=torch.bool)
    for tensor, mark in ((a, True), (b, False)):
        bytes_of = _element_bytes(tensor) - first
        inside = bytes_of[(bytes_of >= 0) & (bytes_of < end - first)]
        if not mark:
            return bool(taken[inside].any())
        taken[inside] = True
    return False


def _element_bytes(tensor: Tensor) -> Tensor:
    """The storage byte of every byte of every element of ``tensor``, flat."""
    size = tensor.element_size()
    starts = torch.full((), tensor.storage_offset() * size, dtype=torch.int64)
    for length, step in zip(tensor.shape, tensor.stride()):
        starts = starts.unsqueeze(-1) + torch.arange(length) * step * size
    return (starts.reshape(-1, 1) + torch.arange(size)).reshape(-1)


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same dtype, shape and bytes (``-0.0`` differs from ``0.0``,
    a NaN equals itself)."""
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape or a.layout != torch.strided or b.layout != torch.strided:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _map_tensors(obj: object, change: Callable[[Tensor], Tensor], done: dict[int, object]) -> object:
    """``obj`` with each tensor replaced by ``change(tensor)``; containers are copied only where
    something changed (``copy.copy`` keeps a state_dict's order and its ``_metadata``), each once,
    so that a container held under two keys stays one."""
    if isinstance(obj, Tensor):
        return change(obj)
    if id(obj) in done:
        return done[id(obj)]
    result = obj
    if isinstance(obj, Mapping):
        changed = {k: new for k, v in obj.items() if (new := _map_tensors(v, change, done)) is not v}
        if changed:
            result = copy.copy(obj)
            result.update(changed)
    elif isinstance(obj, (list, tuple)):
        items = [_map_tensors(v, change, done) for v in obj]
        if not all(a is b for a, b in zip(items, obj)):
            result = type(obj)(items)
    done[id(obj)] = result
    return result


def with_values(container: object, targets: list[tuple[Tensor, Tensor]]) -> tuple[object, Callable[[Tensor], Tensor]]:
    """A copy of ``container`` in which each ``old`` tensor of ``targets`` holds ``new``.

    Every tensor that shares memory with an ``old`` one is rebuilt over one copy of that memory,
    with its own offset, shape and strides: tied keys stay tied, a view stays a view, and both
    read the new values.  Tensors sharing nothing with a target are kept, the same objects.
    Returns the new container and the map from a tensor of the input to its counterpart.
    """
    copies = {}
    for old, _ in targets:
        where = storage_of(old)
        if where is not None and where not in copies:
            copies[where] = old.untyped_storage().clone()
    rebuilt: dict[int, Tensor] = {}

    def counterpart(tensor: Tensor) -> Tensor:
        where = storage_of(tensor)
        if where not in copies:
            return tensor
        if id(tensor) not in rebuilt:
            view = torch.empty(0, dtype=tensor.dtype).set_(
                copies[where], tensor.storage_offset(), tensor.shape, tensor.stride()
            )
            if isinstance(tensor, nn.Parameter):
                view = nn.Parameter(view, requires_grad=tensor.requires_grad)
            rebuilt[id(tensor)] = view
        return rebuilt[id(tensor)]

    result = _map_tensors(container, counterpart, {})
    with torch.no_grad():
        for old, new in targets:
            counterpart(old).copy_(new)
    return result, counterpart
