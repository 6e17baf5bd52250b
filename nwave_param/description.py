"""A constraint's description in a checkpoint: what a saved weight is, as a small tensor.

A registered model saves, beside each tracked weight, the weight's :class:`~nwave_param.Layout`,
the registration's :class:`~nwave_param.ChipSpec` and its hardness, so that a checkpoint describes
itself: loading it restores the hardness, and the command line reads the layouts exactly.

It is a tensor so that a registered ``state_dict()`` holds only tensors, as every tool expects
(safetensors, EMA snapshots ``{k: v.clone()}``, ``copy_`` over two state dicts' values).  The
tensor is 1-D ``int64``, holding 16-bit words like a counter (``num_batches_tracked``), which
tools copy rather than average; a float32 or float64 cast keeps every word exact.  The words
carry a fixed binary record and its CRC-32, so a damaged or averaged description is refused,
never misread.

Version 0.2 saved a dict (``{"format": "nwave_param/1", "layout": ..., "spec": ...}``), without
the hardness; such checkpoints still load, and :func:`decode` reads them.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from .layout import Layout
from .spec import ChipSpec

__all__ = ["Description", "damaged", "decode", "encode"]

LEGACY_FORMAT = "nwave_param/1"  # the dict description of version 0.2
_MAGIC = b"nwp2"
# magic, gates, groups, transposed, limit, group_size, bits (0: none), mismatch, hardness, inputs, core count
_HEAD = struct.Struct("<4sQQ?dQBddQQ")
_CORE = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_WORD_END = 1 << 16  # a description holds 16-bit words


class Description(NamedTuple):
    """What a checkpoint says of one weight.  ``hardness`` is None in a version 0.2 checkpoint."""

    layout: Layout
    spec: ChipSpec
    hardness: float | None

    def fits(self, layout: Layout, spec: ChipSpec) -> bool:
        """Whether the weight it describes reads alike under ``layout`` and ``spec``: the same
        layout and :attr:`ChipSpec.essentials <nwave_param.ChipSpec.essentials>` (a model trained
        with mismatch may be evaluated without it, and the cores decide no weight's value)."""
        return self.layout == layout and self.spec.essentials == spec.essentials


def encode(layout: Layout, spec: ChipSpec, hardness: float) -> Tensor:
    """The description tensor of a weight read with ``layout``, registered with ``spec`` and ``hardness``.

    Example::

        >>> saved = encode(Layout(gates=4), ChipSpec(bits=5), 0.5)
        >>> saved.dtype, decode(saved) == (Layout(gates=4), ChipSpec(bits=5), 0.5)
        (torch.int64, True)
    """
    record = _HEAD.pack(
        _MAGIC, layout.gates, layout.groups, layout.transposed, spec.limit, spec.group_size, spec.bits or 0,
        spec.mismatch, hardness, spec.inputs, len(spec.cores),
    ) + b"".join(_CORE.pack(n) for n in spec.cores)
    record += _CRC.pack(zlib.crc32(record))
    return torch.tensor(struct.unpack(f"<{len(record) // 2}H", record), dtype=torch.int64)


def decode(value: object) -> Description | None:
    """The :class:`Description` held in ``value`` (a tensor :func:`encode` made, or a version 0.2
    dict), or None when ``value`` is not one, or was damaged."""
    if isinstance(value, Tensor):
        return _from_tensor(value)
    if isinstance(value, Mapping) and value.get("format") == LEGACY_FORMAT:
        try:
            return Description(Layout.from_dict(dict(value["layout"])), ChipSpec(**dict(value["spec"])), None)
        except (KeyError, TypeError, ValueError):
            return None
    return None


def damaged(value: object) -> bool:
    """Whether ``value`` has the form of a description (an int64 1-D tensor, or a version 0.2
    dict) but cannot be read: truncated, altered or averaged."""
    form = (isinstance(value, Tensor) and value.dtype == torch.int64 and value.dim() == 1) or (
        isinstance(value, Mapping) and value.get("format") == LEGACY_FORMAT
    )
    return form and decode(value) is None


def _from_tensor(value: Tensor) -> Description | None:
    """The description in ``value``, read with tensor ops until its magic, length and CRC are
    known good: a tensor of any size costs a small constant times its size, and only a record
    that passed them becomes Python objects.

    Its length is no larger than its header says: the words of the head, ``count`` cores and the
    CRC, ``count`` read from the head before the rest is looked at."""
    if value.dim() != 1 or value.layout != torch.strided or value.is_meta or value.is_complex():
        return None
    if value.numel() < (_HEAD.size + _CRC.size) // 2:
        return None
    head = _record(value[: _HEAD.size // 2])
    if head is None or not head.startswith(_MAGIC):
        return None
    count = _HEAD.unpack(head)[-1]
    if value.numel() != (_HEAD.size + count * _CORE.size + _CRC.size) // 2:
        return None
    record = _record(value)
    if record is None:
        return None
    body, crc = memoryview(record)[: -_CRC.size], record[-_CRC.size :]  # a view: no copy
    if _CRC.unpack(crc)[0] != zlib.crc32(body):
        return None
    magic, gates, groups, transposed, limit, group_size, bits, mismatch, hardness, inputs, count = _HEAD.unpack_from(body)
    if not 0 <= hardness <= 1:
        return None
    cores = struct.unpack_from(f"<{count}{_CORE.format[-1]}", body, _HEAD.size)
    try:
        spec = ChipSpec(limit, group_size, bits or None, mismatch, cores, inputs)
        return Description(Layout(gates, groups, transposed), spec, hardness)
    except (TypeError, ValueError):
        return None


def _record(words: Tensor) -> bytes | None:
    """The bytes of ``words`` (16-bit words, held in any real dtype) in little-endian order, or
    None when one of them is not a whole number in ``[0, 2**16)``; in a few tensor ops, each
    one pass over the words."""
    words = words.detach()
    whole = (words >= 0) & (words < _WORD_END)
    if words.dtype.is_floating_point:
        whole &= words == words.trunc()  # NaN is not whole
    if not bool(whole.all()):
        return None
    if words.dtype.is_floating_point:
        words = words.to(torch.int32)  # exact: whole numbers below 2**16
    pairs = torch.empty(words.numel(), 2, dtype=torch.uint8)  # low byte, high byte: little-endian on any machine
    torch.bitwise_and(words.cpu(), 0xFF, out=pairs[:, 0])
    torch.bitwise_right_shift(words.cpu(), 8, out=pairs[:, 1])
    return ctypes.string_at(pairs.data_ptr(), pairs.numel())  # one copy in C (bytes(storage) goes byte by byte)
