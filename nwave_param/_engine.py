"""The engine: the penalties and the hardened values of many weights at once, in few kernels.

What it computes is defined in :mod:`nwave_param.functional`; this module only arranges the
work, and the tests hold it to those definitions, bit for bit.

* A **plan**, made once per architecture, says how: each weight's connectivity matrix is cut into
  *members*, one per population (an LSTM gate, a convolution group), each a strided view of the
  weight; small weights' members go into *packs*, large ones are processed in place.
* A **pack** holds the members of several weights of one dtype in one flat tensor, filled by a
  single copy kernel: members of one column count together, each padded with zero rows to whole
  blocks, so that one ``(blocks, group_size, columns)`` view per column count covers every block
  and a dozen kernels serve a hundred layers.  Zero padding adds nothing to any sum.
* Plans are device-aware.  On the CPU, a large weight (over ``2**16`` elements) is processed in
  place, in chunks of whole blocks that stay in the cache (the penalty) or whole (hardening).  On
  any other device every weight is packed, so the number of kernels per call does not grow with
  a weight's size: launches, not bytes, cost there.

The penalty's gradient is autograd's own subgradient of the formulas (ties and exact zeros
included), written out: a pack computes its gradient direction in the forward, and its backward
is one multiply.  Inside ``torch.compile`` and ``torch.func`` transforms the definitions are
traced as written, and a double backward differentiates them too.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import functional
from .functional import accumulation_dtype, bound, result_dtype
from .layout import Layout
from .spec import ChipSpec

__all__ = ["Shared", "harden_all", "penalty_sums", "planned_as"]

_SMALL = 1 << 16  # on the CPU, weights up to this many elements are packed,
_PACKED = 1 << 20  # up to this many in all (a pack keeps buffers per thread, and its direction until backward)
_CHUNK = 1 << 18  # elements per chunk of a large weight: the chunk stays in the CPU cache

View = tuple[int, int, int, int]  # (offset, blocks, length, columns): blocks of rows of a flat tensor


def _blocks(flat: Tensor, view: View) -> Tensor:
    offset, blocks, length, columns = view
    return flat[offset : offset + blocks * length * columns].view(blocks, length, columns)


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


class Member(NamedTuple):
    """Rows of one weight's connectivity matrix: ``weight.as_strided(shape, stride, offset)``,
    whose first dim is the rows and whose other dims flatten to the columns."""

    index: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    rows: int
    columns: int
    weight: tuple[int, ...]  # the weight's shape

    @property
    def is_weight(self) -> bool:
        """Whether the member is its whole weight, as stored (its region then is the weight)."""
        return self.offset == 0 and self.shape == self.weight and self.stride == _contiguous_stride(self.shape)


def members(index: int, shape: tuple[int, ...], layout: Layout, group_size: int, first_row: int = 0) -> list[Member]:
    """A contiguous weight of ``shape`` read with ``layout``, from row ``first_row`` on, as members:
    stretches of whole blocks (:meth:`Layout.runs`), each closed by at most one short block, which
    the pack's padding completes.  A transposed layout's rows are strided views, one conv group at
    a time (its rows are the group's output channels, its columns the group's inputs x kernel)."""
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
    kernel = math.prod(shape[2:])
    if layout.transposed:  # (in, out/groups, *kernel): M[(g, o), (i, k)] = W[g * in_g + i, o, k]
        inputs, outputs = shape[:2]
        per_group = inputs // layout.groups
        return [
            Member(
                index, (count, per_group, kernel), (kernel, outputs * kernel, 1),
                (first // outputs) * per_group * outputs * kernel + (first % outputs) * kernel, count, per_group * kernel, shape,
            )
            for first, count, _ in stretches
        ]
    columns = math.prod(shape[1:])
    stride = _contiguous_stride(shape)
    return [Member(index, (count, *shape[1:]), stride, first * columns, count, columns, shape) for first, count, _ in stretches]


def _crosses_group(layout: Layout, rows: int, row: int) -> bool:
    """Whether a transposed layout's stretch would go on past a conv group's last row at ``row``:
    a member is one strided view, inside one group."""
    return layout.transposed and row % (rows // layout.groups) == 0


class Pack:
    """Members of weights of one dtype in one flat tensor (see the module docstring).

    Compared by identity (plans are cached); it keeps, per thread, the flat tensor (whose padding
    stays zero), the views of its members, and scratch."""

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

    def buffers(self, like: Tensor) -> tuple[Tensor, list[Tensor], _Scratch]:
        """This thread's flat tensor for weights like ``like``, its member regions, and scratch."""
        buffers = getattr(self.local, "buffers", None)
        if buffers is None or buffers[0].device != like.device:
            with torch.inference_mode(False):  # made under inference mode, they would refuse later in-place updates
                flat = torch.zeros(self.numel, dtype=accumulation_dtype(like.dtype), device=like.device)
                buffers = (flat, self.regions(flat), _Scratch(self.views, self.numel, flat.dtype, flat.device))
            self.local.buffers = buffers
        return buffers

    def scratch(self, flat: Tensor) -> _Scratch:
        """This thread's scratch for the pack held in ``flat``."""
        return self.local.buffers[2]

    def fill(self, weights: Sequence[Tensor]) -> tuple[Tensor, _Scratch]:
        """The pack filled from ``weights`` by one copy kernel, and its scratch."""
        flat, targets, scratch = self.buffers(weights[self.members[0].index])
        sources = [weights[m.index] if whole else source(weights[m.index], m) for m, whole in zip(self.members, self.is_weight)]
        torch._foreach_copy_(targets, sources)
        self.local.fills = getattr(self.local, "fills", 0) + 1  # what Shared.holds checks
        return flat, scratch


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))


def source(weight: Tensor, member: Member) -> Tensor:
    """The member's view of ``weight`` (contiguous; the weight itself where it is one)."""
    if member.is_weight:
        return weight
    return weight.as_strided(member.shape, member.stride, weight.storage_offset() + member.offset)


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


@functools.lru_cache(maxsize=32)
def _plan(shapes: tuple[torch.Size, ...], dtypes: tuple[torch.dtype, ...], layouts: tuple[Layout, ...], group_size: int, device_type: str) -> Plan:
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


def _chunk(m: Tensor, view: View) -> tuple[Tensor, _Scratch]:
    """A chunk of a large weight's matrix as a flat tensor of the accumulation dtype, and scratch."""
    chunk = _blocks(m.view(-1), view).view(-1).to(accumulation_dtype(m.dtype))
    views = ((0, *view[1:]),)
    return chunk, _scratch(views, chunk.numel(), chunk)


# --------------------------------------------------------------------------------------------
# Scratch and the penalty's kernels
# --------------------------------------------------------------------------------------------


class _Scratch:
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
        self.excess, self.signs, self.direction = like(numel), like(numel), like(numel)  # w - clamp(w), sign(w), a chunk's gradient
        self.difference, self.negated, self.lowest, self.steps = like(columns), like(columns), like(columns), like(columns)
        self.kept, self.keep, self.drop = like(columns, kind=torch.bool), like(columns), like(columns)
        self.one = torch.ones((), dtype=dtype, device=device)
        self.bounds = like(2, columns)  # the topology gradient's clamp per block column
        self.part_blocks, self.sum_blocks, self.row_blocks = [], [], []
        self.sign_blocks, self.excess_blocks, self.direction_blocks, self.keep_blocks, self.drop_blocks, self.bound_blocks = [], [], [], [], [], []
        start = 0
        for offset, blocks, length, width in views:
            elements, per_block = slice(offset, offset + blocks * length * width), slice(start, start + blocks * width)
            self.part_blocks.append(self.parts[:, elements].view(4, blocks, length, width))
            self.row_blocks.append(self.part_blocks[-1].unbind(0))
            self.sum_blocks.append(self.sums[:, per_block].view(4, blocks, width))
            for name in ("sign", "excess", "direction"):
                getattr(self, f"{name}_blocks").append(getattr(self, "signs" if name == "sign" else name)[elements].view(blocks, length, width))
            self.keep_blocks.append(self.keep[per_block].view(blocks, 1, width))
            self.drop_blocks.append(self.drop[per_block].view(blocks, 1, width))
            self.bound_blocks.append(self.bounds[:, per_block].view(2, blocks, 1, width).unbind(0))
            start += blocks * width
        self.raw_blocks = [(p[_Scratch.RAW], s[_Scratch.RAW]) for p, s in zip(self.part_blocks, self.sum_blocks)]
        self.held_blocks = [(p[_Scratch.HELD], s[_Scratch.HELD]) for p, s in zip(self.part_blocks, self.sum_blocks)]
        self.all_blocks = list(zip(self.part_blocks, self.sum_blocks))

    def sum_parts(self, rows: slice) -> None:
        """The block-column sums of ``parts[rows]``, into ``sums[rows]``: one kernel per view."""
        pairs = self.raw_blocks if rows == _Scratch.RAW else self.held_blocks if rows == _Scratch.HELD else self.all_blocks
        for blocks, out in pairs:
            torch.sum(blocks, 2, out=out)


_local = threading.local()
_SCRATCHES = 8  # per thread, the most recently used chunk shapes


def _scratch(views: Sequence[View], numel: int, like: Tensor) -> _Scratch:
    """The calling thread's scratch for ``views`` over ``numel`` elements like ``like``.

    A few are kept per thread, the most recently used first, so that a model's chunks of one or
    two shapes reuse theirs while a process going through many shapes holds a bounded amount."""
    scratches = _local.__dict__.setdefault("scratches", collections.OrderedDict())
    key = (tuple(views), like.dtype, like.device)
    scratch = scratches.pop(key, None) or _Scratch(views, numel, like.dtype, like.device)
    scratches[key] = scratch
    while len(scratches) > _SCRATCHES:
        scratches.popitem(last=False)
    return scratch


def _raw_parts(flat: Tensor, scratch: _Scratch) -> None:
    """Each entry's positive and negative side into ``parts[RAW]``."""
    torch.clamp(flat, min=0, out=scratch.rows[0])
    torch.clamp(flat, max=0, out=scratch.rows[1])


def _sums(flat: Tensor, scratch: _Scratch, limit: float, power: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(magnitude, topology, P - Q per block column)`` from ``sums[RAW]`` (P, and -Q); leaves
    ``w - clamp(w)`` in ``scratch.excess``."""
    positive, negative = scratch.sum_rows[0], scratch.sum_rows[1]
    excess = _excess(flat, scratch, limit)
    magnitude = torch.dot(excess, excess) if power == 2 else excess.abs().sum()
    topology = torch.minimum(positive, torch.neg(negative, out=scratch.negated), out=scratch.lowest).sum()
    return magnitude, topology, torch.add(positive, negative, out=scratch.difference)


@functools.lru_cache(maxsize=64)
def _bound_terms(scale: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(c0, c1)``: the topology gradient's clamp per block column is ``c0 + c1 * sign(P - Q)``,
    that is ``[high - scale, high]`` with ``high = scale (1 - sign(P - Q)) / 2``."""
    with torch.inference_mode(False):
        half = 0.5 * scale
        return torch.tensor([[-half], [half]], dtype=dtype, device=device), torch.tensor([[-half], [-half]], dtype=dtype, device=device)


def _directions(flat: Tensor, scratch: _Scratch, difference: Tensor, power: int, alpha: float, lam: float, out: Tensor | None = None) -> list[Tensor]:
    r"""``alpha`` times the gradient of the magnitude sum plus ``lam`` times the topology's, one
    new tensor per view (``out``: written into it instead, the one view of a chunk);
    ``scratch.excess`` must hold ``w - clamp(w)`` (as :func:`_sums` leaves it).

    :math:`\partial \min(P, Q) / \partial M` is ``[M > 0]`` where ``P < Q``, ``-[M < 0]`` where
    ``Q < P`` and ``sign(M) / 2`` on a tie: ``clamp(sign(M), high - 1, high)`` with ``high = (1 -
    sign(P - Q)) / 2`` per block column; exact zeros get 0, as relu'(0) = 0.  ``sign(M)`` is
    ``+-1``, so for ``0 <= lam <= 1`` scaling the bounds scales the result.  The magnitude's is
    ``2 (w - clamp(w))`` (p = 2) or ``sign(w - clamp(w))`` (p = 1), exactly 0 where ``|w| <= limit``.
    """
    folded = 0 <= lam <= 1
    c0, c1 = _bound_terms(lam if folded else 1.0, flat.dtype, flat.device)
    torch.addcmul(c0, c1, torch.sign(difference, out=scratch.steps), out=scratch.bounds)
    torch.sign(flat, out=scratch.signs)
    directions = []
    for signs, (low, high), excess in zip(scratch.sign_blocks, scratch.bound_blocks, scratch.excess_blocks):
        direction = torch.clamp(signs, low, high) if out is None else torch.clamp(signs, low, high, out=out.view(signs.shape))
        if not folded:
            direction.mul_(lam)
        if alpha and power == 2:
            direction.add_(excess, alpha=2 * alpha)
        elif alpha:
            direction.add_(excess.sign(), alpha=alpha)
        directions.append(direction)
    return directions


def _excess(flat: Tensor, scratch: _Scratch, limit: float) -> Tensor:
    """``w - clamp(w, -limit, limit) = sign(w) relu(|w| - limit)``, exactly, into ``scratch.excess``."""
    return torch.sub(flat, torch.clamp(flat, -limit, limit, out=scratch.excess), out=scratch.excess)


# --------------------------------------------------------------------------------------------
# The penalties
# --------------------------------------------------------------------------------------------


class PenaltyConfig(NamedTuple):
    """What the penalty's autograd node computes with, besides the weights."""

    plan: Plan
    layouts: tuple[Layout, ...]
    spec: ChipSpec
    power: int
    dtype: torch.dtype  # of the result
    scales: tuple[float, float] | None  # (alpha, lam): one scaled sum; None: the two sums apart
    gradient: bool  # whether to compute the gradient's directions
    shared: Shared | None


class _PenaltySums(torch.autograd.Function):
    """The penalties of all weights as one autograd node.

    Returns ``(magnitude sum, topology sum)``, or with ``scales = (alpha, lam)`` the single
    ``alpha * magnitude + lam * topology``.  A pack computes its gradient direction in the
    forward (its backward is a multiply); large weights recompute theirs chunk by chunk.
    """

    @staticmethod
    def forward(ctx, config: PenaltyConfig, *weights):
        plan, layouts, spec, power, dtype, scales, gradient, shared = config
        alpha, lam = scales or (1.0, 1.0)
        magnitudes, topologies, saved = [], [], []
        for pack in plan.packs:
            if shared is not None and shared.holds(pack, weights):  # filled, and summed, by this pass's hardening
                flat, scratch = pack.local.buffers[0], pack.local.buffers[2]
            else:
                flat, scratch = pack.fill(weights)
                _raw_parts(flat, scratch)
                scratch.sum_parts(_Scratch.RAW)
            magnitude, topology, difference = _sums(flat, scratch, spec.limit, power)
            magnitudes.append(magnitude)
            topologies.append(topology)
            if not gradient:
                continue
            if scales is None:  # the two directions apart, unscaled
                saved += _directions(flat, scratch, difference, power, 1.0, 0.0)
                saved += _directions(flat, scratch, difference, power, 0.0, 1.0)
            else:  # one direction: alpha * magnitude's + lam * topology's
                saved += _directions(flat, scratch, difference, power, alpha, lam)
        for item in plan.direct:
            m = layouts[item.index].matrix(weights[item.index]).contiguous()
            for view in item.views:
                flat, scratch = _chunk(m, view)
                _raw_parts(flat, scratch)
                scratch.sum_parts(_Scratch.RAW)
                magnitude, topology, difference = _sums(flat, scratch, spec.limit, power)
                magnitudes.append(magnitude)
                topologies.append(topology)
                saved.append(difference.clone())  # its scratch is reused by the next chunk
        if len(magnitudes) == 1:
            magnitude, topology = _in(dtype, magnitudes[0]), _in(dtype, topologies[0])
        else:
            magnitude, topology = torch.stack(magnitudes).sum().to(dtype), torch.stack(topologies).sum().to(dtype)
        ctx.plan, ctx.layouts, ctx.spec, ctx.power, ctx.scales = plan, layouts, spec, power, scales
        ctx.save_for_backward(*weights, *saved)
        if scales is None:
            return magnitude, topology
        return torch.add(topology * lam, magnitude, alpha=alpha)

    @staticmethod
    def backward(ctx, *grads):
        count = len(ctx.layouts)
        weights, saved = ctx.saved_tensors[:count], iter(ctx.saved_tensors[count:])
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formulas themselves
            return (None, *_differentiable_gradient(ctx, weights, *_scaled(ctx.scales, grads)))
        needed = ctx.needs_input_grad[1:]  # after the config
        result: list[Tensor | None] = [None] * count
        parts: dict[int, list[tuple[Member, Tensor]]] = {}  # members of weights that are not one region
        for pack in ctx.plan.packs:
            if ctx.scales is None:
                grad_magnitude, grad_topology = grads
                magnitude_directions = [next(saved) for _ in pack.views]
                per_view = [torch.mul(d, grad_magnitude).addcmul_(next(saved), grad_topology) for d in magnitude_directions]
            else:
                per_view = [torch.mul(next(saved), grads[0]) for _ in pack.views]
            for member, whole, grad in zip(pack.members, pack.is_weight, pack.regions_of_views(per_view)):
                i = member.index
                if not needed[i]:
                    continue
                if whole:  # its region is the weight's gradient (a pack holds every dtype that accumulates in float32)
                    result[i] = _in(weights[i].dtype, grad)
                else:
                    parts.setdefault(i, []).append((member, grad))
        direct = {item.index: item for item in ctx.plan.direct}
        for i, pieces in parts.items():
            if i not in direct:  # a weight of several members: its gradient assembled from them
                result[i] = _assembled(weights[i], pieces)
        alpha, lam = ctx.scales or (1.0, 1.0)
        for item in ctx.plan.direct:
            i, layout = item.index, ctx.layouts[item.index]
            if not needed[i]:
                for _ in item.views:
                    next(saved)
                continue
            m = layout.matrix(weights[i]).contiguous()
            grad = torch.empty_like(m)
            for view in item.views:
                chunk, scratch = _chunk(m, view)
                difference, target = next(saved), _blocks(grad.view(-1), view).view(-1)
                _excess(chunk, scratch, ctx.spec.limit)
                out = target if target.dtype == chunk.dtype else None  # straight into the gradient
                if ctx.scales is None:
                    grad_magnitude, grad_topology = grads
                    (topology,) = _directions(chunk, scratch, difference, ctx.power, 0.0, 1.0, out)
                    topology.mul_(grad_topology)
                    if out is None:
                        topology = target.copy_(topology.view(-1))
                    (magnitude,) = _directions(chunk, scratch, difference, ctx.power, 1.0, 0.0)
                    topology.view(magnitude.shape).addcmul_(magnitude, grad_magnitude)
                else:
                    (direction,) = _directions(chunk, scratch, difference, ctx.power, alpha, lam, out)
                    direction.mul_(grads[0])
                    if out is None:
                        target.copy_(direction.view(-1))
            for member, tail in parts.get(i, ()):  # the short last block came from a pack
                grad[item.tail :].copy_(tail.reshape(-1, grad.shape[1]))
            result[i] = layout.unmatrix(grad, weights[i].shape)
        return (None, *result)



def _scaled(scales, grads) -> tuple[Tensor, Tensor]:
    """``(grad_magnitude, grad_topology)`` from the backward's incoming gradients."""
    if scales is None:
        return grads
    alpha, lam = scales
    return grads[0] * alpha, grads[0] * lam


def _assembled(weight: Tensor, pieces: list[tuple[Member, Tensor]]) -> Tensor:
    """A gradient shaped like ``weight`` from its members' gradients (one copy kernel)."""
    grad = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    torch._foreach_copy_([source(grad, member) for member, _ in pieces], [g for _, g in pieces])
    return grad


def _differentiable_gradient(ctx, weights, grad_magnitude, grad_topology) -> tuple[Tensor | None, ...]:
    with torch.enable_grad():
        magnitude, topology = functional.penalty_sums(weights, ctx.layouts, ctx.spec, ctx.power)
        wanted = [i for i, w in enumerate(weights) if w.requires_grad and ctx.needs_input_grad[1 + i]]
        grads = torch.autograd.grad(
            (magnitude, topology), [weights[i] for i in wanted], (grad_magnitude, grad_topology), create_graph=True, allow_unused=True
        )
    result: list[Tensor | None] = [None] * len(weights)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


def penalty_sums(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    spec: ChipSpec,
    power: int,
    scales: tuple[float, float] | None = None,
    shared: Shared | None = None,
) -> tuple[Tensor, Tensor] | Tensor:
    """:func:`nwave_param.functional.penalty_sums`, fast: ``(magnitude sum, topology sum)`` over
    ``weights``, differentiable; zero for no elements.  With ``scales = (alpha, lam)``, the one
    tensor ``alpha * magnitude + lam * topology``: one autograd node, so a training step pays no
    more.  ``shared``: what :func:`harden_all` left of the same weights in this pass, reused."""
    dtype = result_dtype(weights)
    if not weights or not any(w.numel() for w in weights):
        zero = torch.zeros((), dtype=dtype, device=weights[0].device if weights else None)
        return (zero, zero.clone()) if scales is None else zero
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        magnitude, topology = functional.penalty_sums(weights, layouts, spec, power)  # the compiler fuses it
        return (magnitude, topology) if scales is None else scales[0] * magnitude + scales[1] * topology
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    plan = plan_for(weights, layouts, spec.group_size)
    gradient = torch.is_grad_enabled() and any(w.requires_grad for w in weights)  # else skip the directions
    return _PenaltySums.apply(PenaltyConfig(plan, tuple(layouts), spec, power, dtype, scales, gradient, shared), *weights)


# --------------------------------------------------------------------------------------------
# Hardening
# --------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Returns ``values`` (a list, so that autograd does not track them as inputs); passes each
    one's gradient to its weight unchanged: one node for all the weights of a pass."""

    @staticmethod
    def forward(ctx, values: list[Tensor], *weights: Tensor) -> tuple[Tensor, ...]:
        return tuple(values)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


def _chip_pack(flat: Tensor, scratch: _Scratch, dtype: torch.dtype, spec: ChipSpec, raw: bool) -> list[Tensor]:
    """:func:`functional.project` of every member of a pack at once (``dtype``: its weights'), one new
    tensor per view, equal to the definition bit for bit, in float arithmetic only where the data
    is large (CPU kernels of boolean masks and ``where`` run ten to twenty times slower).  With
    ``raw``, the penalty's parts and sums too.

    Each block column keeps the side whose clamped mass (or, with a grid, whose gain) is larger,
    ``keep = [P - Q >= 0]`` (a NaN keeps the negative side, as ``P >= Q`` does); the value is
    ``positive * keep + negative * (1 - keep)``, exactly the kept side's entries (each product is
    a factor of 0 or 1, and one term is always zero)."""
    top = bound(dtype, spec.limit)
    rows = scratch.rows
    if raw:
        _raw_parts(flat, scratch)
    if spec.bits is None:
        torch.clamp(flat, 0, top, out=rows[2])  # the positive side, in range: its sum is P
        torch.clamp(flat, -top, 0, out=rows[3])  # the negative side: its sum is -Q
        scratch.sum_parts(slice(0, 4) if raw else _Scratch.HELD)
        sides = [(blocks[2], blocks[3]) for blocks in scratch.row_blocks]
    else:
        if raw:
            scratch.sum_parts(_Scratch.RAW)
        held = _round_to_grid(torch.clamp(flat, -top, top), spec, dtype, top)
        kept = held.abs()
        gain = kept - 2 * (kept - flat.abs()).clamp(min=0)  # |w| - |w - q(w)|
        side = torch.sign(held)  # its gain counts on its side: P from the positives, -Q from the negatives
        torch.mul(gain, side.clamp(min=0), out=rows[2])
        torch.mul(gain, side.clamp_(max=0), out=rows[3])
        scratch.sum_parts(_Scratch.HELD)
        positive, negative = held.clamp(min=0), held.clamp(max=0)
        sides = [(_blocks(positive, view), _blocks(negative, view)) for view in scratch.views]
    torch.add(scratch.sum_rows[2], scratch.sum_rows[3], out=scratch.difference)
    scratch.keep.copy_(torch.ge(scratch.difference, 0, out=scratch.kept))
    torch.sub(scratch.one, scratch.keep, out=scratch.drop)
    return [
        torch.mul(positive_blocks, keep).addcmul_(negative_blocks, drop)
        for (positive_blocks, negative_blocks), keep, drop in zip(sides, scratch.keep_blocks, scratch.drop_blocks)
    ]


def _round_to_grid(x: Tensor, spec: ChipSpec, dtype: torch.dtype, top: float) -> Tensor:
    """:func:`functional.round_to_grid` in float arithmetic and two table lookups (its
    ``bucketize`` and gather run a scalar loop per element on the CPU): bit for bit the same.

    ``k0 = round(x / step)`` is the nearest ideal level; the held levels sit up to half an ulp off
    ``k * step``, so the nearest held one is ``k0``'s or its neighbour's on ``x``'s side, whichever
    is nearer, the even ``k`` on a tie.  The distances are exact wherever they decide: ``x`` is
    within a factor of two of the level it is compared with (Sterbenz), or the comparison is with a
    threshold the rounding cannot cross.  A NaN looks up level 0, then stays NaN."""
    levels = _level_table(spec, dtype, x.dtype, x.device)
    k0 = torch.round(x * (spec.levels / spec.limit))  # x / step need not be exact: it only picks the pair
    index0 = k0.nan_to_num(0.0).add_(spec.levels).to(torch.int32)
    level0 = torch.index_select(levels, 0, index0)
    side = torch.sign(x - level0).nan_to_num_(0.0).to(torch.int32)
    level1 = torch.index_select(levels, 0, index0.add_(side).clamp_(0, 2 * spec.levels))
    nearer = torch.sign((x - level0).abs_() - (x - level1).abs_())  # 1: level1 is nearer; 0: a tie (or one level)
    odd = (k0 - 2 * torch.round(k0 * 0.5)).abs_()  # k0 odd: then k1 is the even one
    choice = nearer.clamp(min=0).add_((1 - nearer.abs_()).mul_(odd))
    return torch.copysign(level1.sub_(level0).mul_(choice).add_(level0), x)


@functools.lru_cache(maxsize=64)
def _level_table(spec: ChipSpec, dtype: torch.dtype, compute: torch.dtype, device: torch.device) -> Tensor:
    """The grid's levels as ``dtype`` holds them (the definition's table), in ``compute``."""
    with torch.inference_mode(False):
        return functional._levels(spec, dtype, device).to(compute)


class Shared:
    """What :func:`harden_all` leaves in its packs' buffers for the penalty of the same pass: the
    entries' sides and their block sums.  It holds only while nothing has refilled a pack (another
    model of the same architecture shares the pack) and the weights are unchanged."""

    def __init__(self) -> None:
        self.weights: list[Tensor] = []
        self.versions: list[int] = []
        self.fills: dict[int, int] = {}

    def read(self, weights: Sequence[Tensor]) -> None:
        self.weights, self.versions = list(weights), [w._version for w in weights]

    def holds(self, pack: Pack, weights: Sequence[Tensor]) -> bool:
        return (
            getattr(pack.local, "fills", None) == self.fills.get(id(pack))
            and len(weights) == len(self.weights)
            and all(a is b and a._version == v for a, b, v in zip(weights, self.weights, self.versions))
        )


def harden_all(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    spec: ChipSpec,
    hardness: float,
    noise: float | Sequence[Tensor | None] = 0.0,
    shared: Shared | None = None,
) -> list[Tensor]:
    """:func:`functional.harden` of every weight, computed together: ``w + h (chip(w) - w)``
    plus ``h`` times the noise, with a straight-through gradient per weight (``reg.project_()``
    takes its values at ``h = 1``: :func:`functional.project`).

    ``noise`` is the mismatch: a standard deviation (fresh Gaussian noise drawn once for all the
    weights), or one tensor per weight (``None``: none).  Equal, bit for bit, to the definition
    given the same noise.  With ``shared`` (and gradients on), the packs also get the penalty's
    parts and sums, which :func:`penalty_sums` of the same weights then reuses."""
    if hardness == 0 and (isinstance(noise, float) or all(n is None for n in noise)):
        return list(weights)  # the latent weights themselves, as the definition returns them (no noise is drawn at 0)
    plan = plan_for(weights, layouts, spec.group_size)
    values: list[Tensor | None] = [None] * len(weights)
    whole = {item.index for item in plan.direct}  # large weights on the CPU: hardened whole, below (not their packed tails)
    raw = shared is not None and torch.is_grad_enabled() and not whole  # training: the penalty will read the same packs
    noise_scale = noise if isinstance(noise, float) else 0.0
    if raw:
        shared.read(weights)
    alone = [Pack(members(i, tuple(weights[i].shape), layouts[i], spec.group_size), spec.group_size) for i in sorted(whole)]
    for pack in (*plan.packs, *alone):  # a large weight on the CPU: a pack of its own, made for this call (its buffers go with it)
        alone_pack = pack in alone
        dtype = weights[pack.members[0].index].dtype
        with torch.no_grad():
            flat, scratch = pack.fill(weights)
            per_view = _chip_pack(flat, scratch, dtype, spec, raw and not alone_pack)
            if raw:
                shared.fills[id(pack)] = pack.local.fills
            if hardness != 1 or noise_scale or dtype != flat.dtype:  # in the weights' dtype, as the definition computes
                drawn = _gaussian(_in(dtype, flat), noise_scale) if noise_scale else None  # once for the pack
                per_view = [
                    _hardened(_in(dtype, target), _in(dtype, _blocks(flat, view)), hardness, None if drawn is None else _blocks(drawn, view))
                    for target, view in zip(per_view, pack.views)
                ]
        pieces: dict[int, list[tuple[Member, Tensor]]] = {}
        for member, region in zip(pack.members, pack.regions_of_views(per_view)):
            if member.index in whole and not alone_pack:  # its short last block, packed for the penalty
                continue
            if member.index in pack.whole:
                values[member.index] = region
            else:
                pieces.setdefault(member.index, []).append((member, region))
        for i, parts in pieces.items():
            values[i] = _assembled(weights[i], parts)
    held = [i for i, value in enumerate(values) if value is not None]
    if not isinstance(noise, float):  # one given sample per weight (Registry.on_chip)
        given = [i for i in held if noise[i] is not None]
        if given:
            with torch.no_grad():
                torch._foreach_add_([values[i] for i in given], [noise[i] if hardness == 1 else hardness * noise[i] for i in given])
    result: list[Tensor | None] = [None] * len(weights)
    if held:
        hardened = _StraightThrough.apply([values[i] for i in held], *(weights[i] for i in held))
        for i, value in zip(held, hardened):
            result[i] = value
    for i, weight in enumerate(weights):
        if result[i] is None:  # an empty weight: the definition, as it stands
            result[i] = functional.harden(weight, layouts[i], spec, hardness, None if isinstance(noise, float) else noise[i])
    return result  # type: ignore[return-value]


def _hardened(target: Tensor, latent: Tensor, hardness: float, noise: Tensor | None) -> Tensor:
    """``w + h (chip(w) - w)`` plus ``h`` times the noise, op for op as :func:`functional.harden` computes it."""
    value = target if hardness == 1 else latent + hardness * (target - latent)
    if noise is not None:
        value = value + (noise if hardness == 1 else hardness * noise)
    return value


def _gaussian(like: Tensor, std: float) -> Tensor:
    """Mismatch noise shaped like ``like``: what ``ChipConstraint`` draws for one weight, drawn
    here once for a whole pack."""
    return torch.randn_like(like).mul_(std)


def _in(dtype: torch.dtype, tensor: Tensor) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)
