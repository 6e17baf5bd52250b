"""A constraint's description in a checkpoint: what a saved weight is, as a small tensor.

A registered model saves, beside each tracked weight, the weight's :class:`~nwave_param.Layout`,
the registration's :class:`~nwave_param.ChipSpec` and its hardness, so that a checkpoint describes
itself: loading it restores the hardness, and the command line reads the layouts exactly.

It is a tensor so that a registered ``state_dict()`` holds only tensors, as every tool expects
(safetensors, EMA snapshots ``{k: v.clone()}``, ``copy_`` over two state dicts' values).  The
tensor is 1-D ``int64`` like a counter (``num_batches_tracked``), which tools copy rather than
average.  It holds a fixed binary record and its CRC-32, so a damaged description is refused,
never misread.  Each 16-bit word ``w`` of the record is stored as ``2 w + 1`` and read back as
``floor(x / 2)``: an EMA that blends a description with itself in float arithmetic, such as
timm's ``ModelEmaV2`` (``e.copy_(d * e + (1 - d) * m)``), lands within 1 of ``2 w + 1`` and, cast
back to int64 by truncation, on ``2 w`` or ``2 w + 1``: the same word.  A float32 or float64 cast
keeps it exact (every value is below ``2**17``).

The record starts with a magic and a format number: ``nwp3`` is this format, which records the
layout's ``inputs_first`` and the spec's ``reset`` too; ``nwp2``, nwave_param 0.3's, stored the
words as they are, without those two, and still reads (as ``inputs_first=False``, ``reset=None``:
not recorded); a higher number was written by a newer nwave_param and is refused as such
(:class:`NewerDescriptionError`).  Version 0.2 saved a dict
(``{"format": "nwave_param/1", "layout": ..., "spec": ...}``), without the hardness; such
checkpoints still load, and :func:`decode` reads them.
"""

from __future__ import annotations

import ctypes
import struct
import zlib
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["Description", "NewerDescriptionError", "damaged", "decode", "encode"]

LEGACY_FORMAT = "nwave_param/1"  # the dict description of version 0.2
_FAMILY = b"nwp"  # then the format number, as one ASCII digit
FORMAT = 3  # this format: each word w stored as 2 w + 1
_PLAIN_WORDS = 2  # nwave_param 0.3's: the words as they are
# magic, gates, groups, transposed, inputs_first, limit, group_size, bits (0: none), reset, mismatch,
# hardness, inputs, core count; then the cores and the CRC
_HEAD = struct.Struct("<4sQQ??dQBBddQQ")
# nwave_param 0.3's: no inputs_first (always False), no reset (not recorded: None)
_HEAD_0_3 = struct.Struct("<4sQQ?dQBddQQ")
_RESETS = (None, "subtract", "zero")  # reset's code is its index
_CORE = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_WORD_END = 1 << 16  # a record is made of 16-bit words


class NewerDescriptionError(ValueError):
    """A description written by a newer nwave_param, in a format this one cannot read."""


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
    magic = _FAMILY + str(FORMAT).encode()
    record = _HEAD.pack(
        magic, layout.gates, layout.groups, layout.transposed, layout.inputs_first, spec.limit, spec.group_size,
        spec.bits or 0, _RESETS.index(spec.reset), spec.mismatch, hardness, spec.inputs, len(spec.cores),
    ) + b"".join(_CORE.pack(n) for n in spec.cores)
    record += _CRC.pack(zlib.crc32(record))
    words = torch.tensor(struct.unpack(f"<{len(record) // 2}H", record), dtype=torch.int64)
    return words.mul_(2).add_(1)


def decode(value: object) -> Description | None:
    """The :class:`Description` held in ``value`` (a tensor :func:`encode` made, one of version
    0.3, or a version 0.2 dict), or None when ``value`` is not one, or was damaged.

    Raises:
        NewerDescriptionError: ``value`` is a description of a format newer than this one's.
    """
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
    dict) but cannot be read: truncated, altered or averaged (one of a newer format is not
    damaged: :func:`decode` says so)."""
    form = (isinstance(value, Tensor) and value.dtype == torch.int64 and value.dim() == 1) or (
        isinstance(value, Mapping) and value.get("format") == LEGACY_FORMAT
    )
    try:
        return form and decode(value) is None
    except NewerDescriptionError:
        return False


def _from_tensor(value: Tensor) -> Description | None:
    """The description in ``value``, read with tensor ops until its magic, length and CRC are
    known good: a tensor of any size costs a small constant times its size, and only a record
    that passed them becomes Python objects.

    Its length is no larger than its header says: the words of the head, ``count`` cores and the
    CRC, ``count`` read from the head before the rest is looked at."""
    if value.dim() != 1 or value.layout != torch.strided or value.is_meta or value.is_complex():
        return None
    if value.numel() < 2:
        return None
    found = next((f for f in (FORMAT, _PLAIN_WORDS) if _magic(value[:2], f == _PLAIN_WORDS) is not None), None)
    if found is None:
        return None
    number = _magic(value[:2], found == _PLAIN_WORDS)
    if number > FORMAT:
        raise NewerDescriptionError(
            f"a description written by a newer nwave_param (format {number}; this one reads up to {FORMAT}): upgrade nwave_param"
        )
    if number != found:
        return None
    plain, head_format = found == _PLAIN_WORDS, _HEAD_0_3 if found == _PLAIN_WORDS else _HEAD
    if value.numel() < (head_format.size + _CRC.size) // 2:
        return None
    head = _record(value[: head_format.size // 2], plain)
    if head is None:
        return None
    count = head_format.unpack(head)[-1]
    if value.numel() != (head_format.size + count * _CORE.size + _CRC.size) // 2:
        return None
    record = _record(value, plain)
    if record is None:
        return None
    body, crc = memoryview(record)[: -_CRC.size], record[-_CRC.size :]  # a view: no copy
    if _CRC.unpack(crc)[0] != zlib.crc32(body):
        return None
    if plain:
        magic, gates, groups, transposed, limit, group_size, bits, mismatch, hardness, inputs, count = _HEAD_0_3.unpack_from(body)
        inputs_first, reset = False, None
    else:
        (
            magic, gates, groups, transposed, inputs_first, limit, group_size, bits, reset, mismatch, hardness, inputs, count
        ) = _HEAD.unpack_from(body)
        if reset >= len(_RESETS):
            return None
        reset = _RESETS[reset]
    if not 0 <= hardness <= 1:
        return None
    cores = struct.unpack_from(f"<{count}{_CORE.format[-1]}", body, head_format.size)
    try:
        spec = ChipSpec(limit, group_size, bits or None, mismatch, cores, inputs, reset)
        return Description(Layout(gates, groups, transposed, inputs_first), spec, hardness)
    except (TypeError, ValueError):
        return None


def _magic(words: Tensor, plain: bool) -> int | None:
    """The format number in the first two words, read as stored plain or as ``2 w + 1``; None
    when they do not start a description."""
    head = _record(words, plain)
    if head is None or not head.startswith(_FAMILY) or not head[3:4].isdigit():
        return None
    return int(head[3:4])


def _record(words: Tensor, plain: bool = False) -> bytes | None:
    """The bytes of ``words`` in little-endian order, each word stored plain (a whole number in
    ``[0, 2**16)``, as 0.3 wrote them) or as ``2 w + 1`` (``floor(x / 2)`` of any number in
    ``[0, 2**17)``); None where one is not; in a few tensor ops, each one pass over the words."""
    words = words.detach()
    if not plain:
        words = torch.div(words.double() if words.dtype == torch.float64 else words.float(), 2, rounding_mode="floor")
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
