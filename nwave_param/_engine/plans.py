"""How the engine lays out its work (members, packs, plans and scratch), and the small pieces both
of its computations (:mod:`.penalties`, :mod:`.hardening`) use on that layout.

* A **plan**, made once per architecture, says how: each weight's connectivity matrix is cut into
  *members*, one per stretch of whole blocks of a population (an LSTM gate, a convolution group),
  each a strided view of the weight; small weights' members go into *packs*, large ones are
  processed in place.
* A **pack** holds the members of several weights of one dtype in one flat tensor, filled by a
  single copy kernel: members of one column count together, each padded with zero rows to whole
  blocks, so that one ``(blocks, group_size, columns)`` view per column count covers every block
  and a dozen kernels serve a hundred layers.  Zero padding adds nothing to any sum.
* Plans are device-aware.  On the CPU, a large weight (over ``2**16`` elements) is processed in
  place, in chunks of whole blocks that stay in the cache.  On any other device every weight is
  packed, so the number of kernels per call does not grow with a weight's size: launches, not
  bytes, cost there.
* **Scratch**: the reused tensors a pack or chunk computes in, with every view of them made once.
* Shared by the penalties and the hardening: :class:`Shared` (what a pass's hardening leaves in
  its packs for the penalty of the same pass), :func:`raw_parts` (the entries' two sides, the
  penalty's parts), :func:`assembled` (a weight's tensor from its members' pieces) and
  :func:`in_dtype`.

Exactness: nothing here computes a value.  Filling a pack or a chunk copies the weights' values,
widened to the accumulation dtype (float32, or float64 for float64 weights), which is exact;
:func:`raw_parts` clamps at zero and :func:`assembled` copies, both exact; :func:`in_dtype` is a
plain cast.  Which results are bit for bit :mod:`nwave_param.functional`'s and which agree within
a tolerance is said in :mod:`.penalties` and :mod:`.hardening`; ``tests/test_fast_path.py`` checks
both on every route a plan can take (all packed, all in chunks, in chunks of a few blocks,
planned as on a GPU).
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nwave_param._memo import memoized
from nwave_param.functional import accumulation_dtype
from nwave_param.layout import Layout

__all__ = [
    "Buffers",
    "Direct",
    "Member",
    "Pack",
    "Plan",
    "Scratch",
    "Shared",
    "View",
    "assembled",
    "blocks",
    "chunk",
    "in_dtype",
    "members",
    "plan_for",
    "planned_as",
    "raw_parts",
    "source",
]

_SMALL = 1 << 16  # on the CPU, weights up to this many elements are packed,
_PACKED = 1 << 20  # up to this many in all (a pack keeps buffers per thread, and its direction until backward)
_CHUNK = 1 << 18  # elements per chunk of a large weight: the chunk stays in the CPU cache

View = tuple[int, int, int, int]  # (offset, blocks, length, columns): blocks of rows of a flat tensor


def blocks(flat: Tensor, view: View) -> Tensor:
    """The elements of ``flat`` that ``view`` covers, as ``(blocks, length, columns)``."""
    offset, count, length, columns = view
    return flat[offset : offset + count * length * columns].view(count, length, columns)


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


class Member(NamedTuple):
    """Rows of one weight's connectivity matrix, as a view of the weight: dim ``k`` of the member
    runs along dim ``dims[k]`` of the weight, from index ``starts[dims[k]]``, ``shape[k]`` long.
    Its first dim is the rows and its other dims flatten, in order, to the columns.

    The view is taken with the weight's own strides (:func:`source`), so any memory format reads
    the right elements: a channels_last convolution, a transposed or sliced Parameter."""

    index: int
    shape: tuple[int, ...]
    dims: tuple[int, ...]  # a permutation of the weight's dims
    starts: tuple[int, ...]  # per dim of the weight
    rows: int
    columns: int
    weight: tuple[int, ...]  # the weight's shape

    @property
    def is_weight(self) -> bool:
        """Whether the member is its whole weight, in the weight's own dim order."""
        return self.shape == self.weight and self.dims == tuple(range(len(self.weight)))


def members(index: int, shape: tuple[int, ...], layout: Layout, group_size: int, first_row: int = 0) -> list[Member]:
    """A weight of ``shape`` read with ``layout``, from row ``first_row`` on, as members:
    stretches of whole blocks (:meth:`Layout.runs`), each closed by at most one short block, which
    the pack's padding completes.  A transposed layout's rows are one conv group's output channels
    (dim 1 of its ``(in, out/groups, *kernel)`` weight), its columns the group's inputs x kernel;
    an inputs-first layout's rows are dim 1 of its ``[in, out]`` weight."""
    rows = layout.rows(shape)
    stretches: list[list[int]] = []  # [first row, rows, open]: open while every block so far was whole
    for start, count, length in layout.runs(rows, group_size):
        for block in range(start, start + count * length, length):
            if block < first_row:
                continue
            if stretches and stretches[-1][2] and stretches[-1][0] + stretches[-1][1] == block and not _crosses_group(layout, rows, block):
                stretches[-1][1] += length
            else:
                stretches.append([block, length, True])
            stretches[-1][2] = length == group_size
    kernel = shape[2:]
    if layout.inputs_first:  # M = W.T: rows are dim 1
        return [Member(index, (count, shape[0]), (1, 0), (0, first), count, shape[0], shape) for first, count, _ in stretches]
    if layout.transposed:  # M[(g, o), (i, k)] = W[g * in_g + i, o, k]
        inputs, outputs = shape[:2]
        per_group = inputs // layout.groups
        dims = (1, 0, *range(2, len(shape)))
        return [
            Member(
                index, (count, per_group, *kernel), dims, ((first // outputs) * per_group, first % outputs, *(0 for _ in kernel)),
                count, per_group * math.prod(kernel), shape,
            )
            for first, count, _ in stretches
        ]
    columns = math.prod(shape[1:])
    dims = tuple(range(len(shape)))
    return [
        Member(index, (count, *shape[1:]), dims, (first, *(0 for _ in shape[1:])), count, columns, shape) for first, count, _ in stretches
    ]


def _crosses_group(layout: Layout, rows: int, row: int) -> bool:
    """Whether a transposed layout's stretch would go on past a conv group's last row at ``row``:
    a member is one strided view, inside one group."""
    return layout.transposed and row % (rows // layout.groups) == 0


class Buffers(NamedTuple):
    """What a pack keeps per thread (:meth:`Pack.buffers`)."""

    flat: Tensor  # the pack's values, in the accumulation dtype; its padding stays zero
    regions: list[Tensor]  # each member's region of ``flat``, in the member's shape: what a fill copies into
    scratch: Scratch  # what computations over ``flat`` work in


class Pack:
    """Members of weights of one dtype in one flat tensor (see the module docstring).

    Compared by identity (plans are cached); it keeps, per thread, its :class:`Buffers` and how
    many times it was filled (``local.fills``, what :meth:`Shared.holds` checks)."""

    def __init__(self, members: Sequence[Member], group_size: int) -> None:
        self.members = tuple(sorted(members, key=lambda m: m.columns))  # one block view per column count
        self.places, views, offset = [], [], 0
        for member in self.members:
            blocks = -(-member.rows // group_size)
            self.places.append(offset)
            if views and views[-1][3] == member.columns:
                views[-1] = (views[-1][0], views[-1][1] + blocks, group_size, member.columns)
            else:
                views.append((offset, blocks, group_size, member.columns))
            offset += blocks * group_size * member.columns
        self.views, self.numel = tuple(views), offset
        self.whole = {m.index for m in self.members if m.is_weight}
        # what each call needs, made once: the members' regions as strided views, and whether a member is its weight
        self.shapes = [(m.shape, _contiguous_stride(m.shape), place) for m, place in zip(self.members, self.places)]
        self.is_weight = [m.index in self.whole for m in self.members]
        starts = [view[0] for view in self.views]
        self.in_view = [  # the member's view, and its region's shape, strides and offset within that view's block tensor
            (v := max(i for i, start in enumerate(starts) if start <= place), m.shape, _contiguous_stride(m.shape), place - starts[v])
            for m, place in zip(self.members, self.places)
        ]
        self.local = threading.local()

    def regions(self, flat: Tensor) -> list[Tensor]:
        """Each member's values in a pack-shaped ``flat``, in the member's shape."""
        return [flat.as_strided(shape, stride, flat.storage_offset() + place) for shape, stride, place in self.shapes]

    def regions_of_views(self, per_view: Sequence[Tensor]) -> list[Tensor]:
        """Each member's values in pack-shaped data held one tensor per view (a view's blocks)."""
        return [per_view[v].as_strided(shape, stride, per_view[v].storage_offset() + offset) for v, shape, stride, offset in self.in_view]

    def buffers(self, like: Tensor) -> Buffers:
        """This thread's buffers for weights like ``like`` (made on first use, and again on another device)."""
        buffers: Buffers | None = getattr(self.local, "buffers", None)
        if buffers is None or buffers.flat.device != like.device:
            with torch.inference_mode(False):  # made under inference mode, they would refuse later in-place updates
                flat = torch.zeros(self.numel, dtype=accumulation_dtype(like.dtype), device=like.device)
                buffers = Buffers(flat, self.regions(flat), Scratch(self.views, self.numel, flat.dtype, flat.device))
            self.local.buffers = buffers
        return buffers

    def fill(self, weights: Sequence[Tensor]) -> tuple[Tensor, Scratch]:
        """The pack filled from ``weights`` by one copy kernel, and its scratch."""
        buffers = self.buffers(weights[self.members[0].index])
        sources = [weights[m.index] if whole else source(weights[m.index], m) for m, whole in zip(self.members, self.is_weight)]
        torch._foreach_copy_(buffers.regions, sources)
        self.local.fills = getattr(self.local, "fills", 0) + 1  # what Shared.holds checks
        return buffers.flat, buffers.scratch


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))


def source(weight: Tensor, member: Member) -> Tensor:
    """The member's view of ``weight``, through the weight's own strides (the weight itself where
    the member is all of it)."""
    if member.is_weight:
        return weight
    strides = weight.stride()
    offset = weight.storage_offset() + sum(start * step for start, step in zip(member.starts, strides))
    return weight.as_strided(member.shape, tuple(strides[d] for d in member.dims), offset)


class Direct(NamedTuple):
    """A large weight on the CPU: its whole blocks in chunks (a short last block, if any, is packed)."""

    index: int
    views: tuple[View, ...]
    tail: int  # the first row held by a pack (the matrix's row count when none is)


class Plan(NamedTuple):
    packs: tuple[Pack, ...]  # one per weight dtype
    direct: tuple[Direct, ...]


def _chunks(columns: int, runs) -> tuple[View, ...]:
    views = []
    for start, count, length in runs:
        step = max(1, _CHUNK // (length * columns))
        for first in range(0, count, step):
            views.append(((start + first * length) * columns, min(step, count - first), length, columns))
    return tuple(views)


_planned_as = threading.local()


@contextlib.contextmanager
def planned_as(device_type: str) -> Iterator[None]:
    """Plan as if the weights lived on ``device_type`` (for tests and op counts: this machine has
    no GPU, and the number of kernels a GPU would launch is what the plan decides)."""
    before = getattr(_planned_as, "device_type", None)
    _planned_as.device_type = device_type
    try:
        yield
    finally:
        _planned_as.device_type = before


def plan_for(weights: Sequence[Tensor], layouts: Sequence[Layout], group_size: int) -> Plan:
    device_type = getattr(_planned_as, "device_type", None) or weights[0].device.type
    return _plan(tuple(w.shape for w in weights), tuple(w.dtype for w in weights), tuple(layouts), group_size, device_type)


@memoized(32)
def _plan(
    shapes: tuple[torch.Size, ...], dtypes: tuple[torch.dtype, ...], layouts: tuple[Layout, ...], group_size: int, device_type: str
) -> Plan:
    """Which members are packed and which weights are processed in place; once per architecture."""
    packed: dict[torch.dtype, list[Member]] = {}
    direct, total = [], 0
    for i, (shape, dtype, layout) in enumerate(zip(shapes, dtypes, layouts)):
        numel = math.prod(shape)
        if numel == 0:
            continue
        if device_type != "cpu" or (numel <= _SMALL and total + numel <= _PACKED):
            packed.setdefault(dtype, []).extend(members(i, tuple(shape), layout, group_size))
            total += numel
            continue
        rows = layout.rows(shape)
        runs, tail = layout.runs(rows, group_size), rows
        if layout == Layout() and rows % group_size and rows > group_size:  # the short last block goes to a pack
            tail = rows - rows % group_size
            packed.setdefault(dtype, []).extend(members(i, tuple(shape), layout, group_size, first_row=tail))
            runs = runs[:-1]
        direct.append(Direct(i, _chunks(numel // rows, runs), tail))
    return Plan(tuple(Pack(m, group_size) for m in packed.values()), tuple(direct))


def chunk(m: Tensor, view: View) -> tuple[Tensor, Scratch]:
    """A chunk of a large weight's matrix as a flat tensor of the accumulation dtype, and scratch."""
    chunk = blocks(m.view(-1), view).view(-1).to(accumulation_dtype(m.dtype))
    views = ((0, *view[1:]),)
    return chunk, _scratch(views, chunk.numel(), chunk)


class Scratch:
    """Reused tensors, and every view of them made once, for one set of views over ``numel``
    elements: each call allocates only what it returns or keeps for backward, and makes no view
    of its own (a view costs a dispatched op, and a fresh large allocation page faults).

    ``parts`` holds four rows: the entries' positive and negative sides (the penalty's), then the
    same clamped into the range (the projection's, or with a grid its gains); ``sums`` their sums
    per block column."""

    RAW, HELD = slice(0, 2), slice(2, 4)  # the rows of parts and sums

    @torch.inference_mode(False)  # made under inference mode, they would refuse later in-place updates
    def __init__(self, views: Sequence[View], numel: int, dtype: torch.dtype, device: torch.device) -> None:
        columns = sum(blocks * width for _, blocks, _, width in views)

        def like(*shape, kind=dtype):
            return torch.empty(*shape, dtype=kind, device=device)

        self.views = tuple(views)
        self.parts, self.sums = like(4, numel), like(4, columns)
        self.rows, self.sum_rows = self.parts.unbind(0), self.sums.unbind(0)
        self.excess, self.signs = like(numel), like(numel)  # w - clamp(w), sign(w)
        self.difference, self.negated, self.lowest, self.steps = like(columns), like(columns), like(columns), like(columns)
        self.kept, self.keep, self.drop = like(columns, kind=torch.bool), like(columns), like(columns)
        self.one = torch.ones((), dtype=dtype, device=device)
        self.bounds = like(2, columns)  # the topology gradient's clamp per block column
        self.part_blocks, self.sum_blocks, self.row_blocks = [], [], []
        self.sign_blocks, self.excess_blocks, self.keep_blocks, self.drop_blocks, self.bound_blocks = [], [], [], [], []
        start = 0
        for offset, blocks, length, width in views:
            elements, per_block = slice(offset, offset + blocks * length * width), slice(start, start + blocks * width)
            self.part_blocks.append(self.parts[:, elements].view(4, blocks, length, width))
            self.row_blocks.append(self.part_blocks[-1].unbind(0))
            self.sum_blocks.append(self.sums[:, per_block].view(4, blocks, width))
            self.sign_blocks.append(self.signs[elements].view(blocks, length, width))
            self.excess_blocks.append(self.excess[elements].view(blocks, length, width))
            self.keep_blocks.append(self.keep[per_block].view(blocks, 1, width))
            self.drop_blocks.append(self.drop[per_block].view(blocks, 1, width))
            self.bound_blocks.append(self.bounds[:, per_block].view(2, blocks, 1, width).unbind(0))
            start += blocks * width
        self.raw_blocks = [(p[Scratch.RAW], s[Scratch.RAW]) for p, s in zip(self.part_blocks, self.sum_blocks)]
        self.held_blocks = [(p[Scratch.HELD], s[Scratch.HELD]) for p, s in zip(self.part_blocks, self.sum_blocks)]
        self.all_blocks = list(zip(self.part_blocks, self.sum_blocks))
        self._workspaces: dict[torch.dtype, list[Tensor]] = {}

    def workspace(self, count: int, dtype: torch.dtype | None = None) -> list[Tensor]:
        """``count`` tensors of one element per entry (``dtype``: default the scratch's), for
        temporaries.  On the CPU they are made once and reused: a fresh large allocation there
        page faults every call.  Elsewhere (a GPU's caching allocator reuses memory) they are new."""
        dtype = dtype or self.excess.dtype
        if self.excess.device.type != "cpu":
            return [torch.empty_like(self.excess, dtype=dtype) for _ in range(count)]
        made = self._workspaces.setdefault(dtype, [])
        if len(made) < count:
            with torch.inference_mode(False):
                made += [torch.empty_like(self.excess, dtype=dtype) for _ in range(count - len(made))]
        return made[:count]

    def sum_parts(self, rows: slice) -> None:
        """The block-column sums of ``parts[rows]``, into ``sums[rows]``: one kernel per view."""
        pairs = self.raw_blocks if rows == Scratch.RAW else self.held_blocks if rows == Scratch.HELD else self.all_blocks
        for blocks, out in pairs:
            torch.sum(blocks, 2, out=out)


_local = threading.local()
_SCRATCHES = 8  # per thread, the most recently used chunk shapes


def _scratch(views: Sequence[View], numel: int, like: Tensor) -> Scratch:
    """The calling thread's scratch for ``views`` over ``numel`` elements like ``like``.

    A few are kept per thread, the most recently used first, so that a model's chunks of one or
    two shapes reuse theirs while a process going through many shapes holds a bounded amount."""
    scratches = _local.__dict__.setdefault("scratches", collections.OrderedDict())
    key = (tuple(views), like.dtype, like.device)
    scratch = scratches.pop(key, None) or Scratch(views, numel, like.dtype, like.device)
    scratches[key] = scratch
    while len(scratches) > _SCRATCHES:
        scratches.popitem(last=False)
    return scratch


# --------------------------------------------------------------------------------------------
# Shared by the penalties and the hardening
# --------------------------------------------------------------------------------------------


class Shared:
    """What :func:`~nwave_param._engine.hardening.harden_all` leaves in its packs' buffers for
    :func:`~nwave_param._engine.penalties.penalty_sums` of the same pass: the entries' sides and
    their block sums.  It holds only while nothing has refilled a pack (another model of the same
    architecture shares the pack) and the weights are unchanged."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []
        self.versions: list[int] = []
        self.fills: dict[int, int] = {}  # id(pack) -> the pack's fill count when the hardening left the parts in it

    def read(self, weights: Sequence[Tensor]) -> None:
        """The hardening is about to leave the parts of ``weights``: remember them and their versions."""
        self.weights, self.versions = list(weights), [w._version for w in weights]

    def filled(self, pack: Pack) -> None:
        """The hardening has just filled ``pack`` and left the penalty's parts and sums in its buffers."""
        self.fills[id(pack)] = pack.local.fills

    def holds(self, pack: Pack, weights: Sequence[Tensor]) -> bool:
        """Whether ``pack``'s buffers still hold what the hardening left of ``weights``."""
        return (
            getattr(pack.local, "fills", None) == self.fills.get(id(pack))
            and len(weights) == len(self.weights)
            and all(a is b and a._version == v for a, b, v in zip(weights, self.weights, self.versions))
        )


def raw_parts(flat: Tensor, scratch: Scratch) -> None:
    """Each entry's positive and negative side into ``parts[RAW]`` (the penalty's P and -Q, once summed)."""
    torch.clamp(flat, min=0, out=scratch.rows[0])
    torch.clamp(flat, max=0, out=scratch.rows[1])


def assembled(weight: Tensor, pieces: Sequence[tuple[Member, Tensor]]) -> Tensor:
    """A new tensor shaped like ``weight`` from the pieces of its members (a value or a gradient
    per member, one copy kernel for all); together the members cover the weight."""
    result = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    torch._foreach_copy_([source(result, member) for member, _ in pieces], [piece for _, piece in pieces])
    return result


def in_dtype(dtype: torch.dtype, tensor: Tensor) -> Tensor:
    """``tensor`` in ``dtype``: itself when it already is (a cast would cost a kernel)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
