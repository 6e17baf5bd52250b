"""The engine: the penalties of many weights in few kernels.

What it computes is defined in :mod:`nwave_param.functional`; this module only arranges the
work, and the tests hold it to those definitions.  Its gradient is autograd's own subgradient of
the formulas (ties and exact zeros included), written out so that few kernels run:

* small weights of one population (up to ``2**16`` elements each) are copied into one padded
  pack by a single kernel, so a model of many small layers costs a dozen kernels, not a dozen
  per layer; the pack's gradient is computed with its forward, and backward is one multiply;
* large weights are processed in chunks of whole blocks that stay in the CPU cache while the
  formula's operations run on them.

Inside ``torch.compile`` and ``torch.func`` transforms the definitions are traced as written,
and a double backward differentiates them too.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .functional import accumulation_dtype, result_dtype
from . import functional
from .layout import Layout
from .spec import ChipSpec

__all__ = ["penalty_sums"]


# The fast path computes the same sums on block views ``(offset, blocks, length, columns)`` of a
# flat tensor: a ``(blocks, length, columns)`` stretch whose block columns run along dim 1.  Zero
# padding adds nothing to any sum.

View = tuple[int, int, int, int]


def _blocks(flat: Tensor, view: View) -> Tensor:
    offset, blocks, length, columns = view
    return flat[offset : offset + blocks * length * columns].view(blocks, length, columns)


class _Scratch:
    """Reused tensors, and their block views made once, for one set of views over ``numel``
    elements: the hot path allocates nothing but what it returns or keeps for backward
    (fresh large allocations cost page faults, and each view costs Python time)."""

    @torch.inference_mode(False)  # made under inference mode, they would refuse later in-place updates
    def __init__(self, views: Sequence[View], numel: int, dtype: torch.dtype, device: torch.device) -> None:
        columns = sum(blocks * width for _, blocks, _, width in views)
        self.views = tuple(views)
        self.parts = torch.empty(2, numel, dtype=dtype, device=device)  # relu(w), min(w, 0)
        self.excess = torch.empty(numel, dtype=dtype, device=device)  # w - clamp(w)
        self.direction = torch.empty(numel, dtype=dtype, device=device)
        self.sums = torch.empty(2, columns, dtype=dtype, device=device)  # P, -Q per block column
        self.bounds = torch.empty(2, columns, dtype=dtype, device=device)  # the direction's clamp
        self.part_blocks, self.sum_blocks, self.direction_blocks, self.bound_blocks = [], [], [], []
        start = 0
        for offset, blocks, length, width in views:
            size = blocks * length * width
            self.part_blocks.append(self.parts[:, offset : offset + size].view(2, blocks, length, width))
            self.sum_blocks.append(self.sums[:, start : start + blocks * width].view(2, blocks, width))
            self.direction_blocks.append(self.direction[offset : offset + size].view(blocks, length, width))
            self.bound_blocks.append(self.bounds[:, start : start + blocks * width].view(2, blocks, 1, width))
            start += blocks * width


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


def _sums(flat: Tensor, scratch: _Scratch, limit: float, power: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(magnitude, topology, P - Q per block column)``; leaves ``w - clamp(w)`` in ``scratch.excess``."""
    torch.clamp(flat, min=0, out=scratch.parts[0])
    torch.clamp(flat, max=0, out=scratch.parts[1])
    for blocks, out in zip(scratch.part_blocks, scratch.sum_blocks):
        torch.sum(blocks, 2, out=out)
    positive, negative = scratch.sums[0], scratch.sums[1].neg_()
    excess = _excess(flat, scratch, limit)
    magnitude = torch.dot(excess, excess) if power == 2 else excess.abs().sum()
    return magnitude, torch.minimum(positive, negative).sum(), positive - negative


def _directions(
    flat: Tensor, scratch: _Scratch, difference: Tensor, power: int, lam: float, alpha: float, out: Tensor | None = None
) -> Tensor:
    r"""``lam`` times the gradient of the topology sum plus ``alpha`` times the magnitude's, in
    ``out`` (default ``scratch.direction``); ``scratch.excess`` must hold ``w - clamp(w)`` (as
    :func:`_sums` leaves it).

    :math:`\partial \min(P, Q) / \partial M` is ``[M > 0]`` where ``P < Q``, ``-[M < 0]`` where
    ``Q < P`` and ``sign(M) / 2`` on a tie: ``clamp(sign(M), high - 1, high)`` with ``high = (1 -
    sign(P - Q)) / 2`` per block column; exact zeros get 0, as relu'(0) = 0.  ``sign(M)`` is
    ``+-1``, so for ``0 <= lam <= 1`` scaling the bounds scales the result.  The magnitude's is
    ``2 (w - clamp(w))`` (p = 2) or ``sign(w - clamp(w))`` (p = 1), exactly 0 where ``|w| <= limit``.
    """
    folded = 0 <= lam <= 1
    scale = lam if folded else 1.0
    high = torch.rsub(torch.sign(difference), 0.5 * scale, alpha=0.5 * scale)
    torch.sub(high, scale, out=scratch.bounds[0])
    scratch.bounds[1].copy_(high)
    direction = torch.sign(flat, out=scratch.direction if out is None else out)
    blocks = scratch.direction_blocks if out is None else [_blocks(out, view) for view in scratch.views]
    for block, bounds in zip(blocks, scratch.bound_blocks):
        block.clamp_(bounds[0], bounds[1])
    if not folded:
        direction.mul_(lam)
    if alpha and power == 2:
        direction.add_(scratch.excess, alpha=2 * alpha)
    elif alpha:
        direction.add_(scratch.excess.sign(), alpha=alpha)
    return direction


def _excess(flat: Tensor, scratch: _Scratch, limit: float) -> Tensor:
    """``w - clamp(w, -limit, limit) = sign(w) relu(|w| - limit)``, exactly, into ``scratch.excess``."""
    return torch.sub(flat, torch.clamp(flat, -limit, limit, out=scratch.excess), out=scratch.excess)


_SMALL = 1 << 16  # weights up to this many elements are packed together,
_PACKED = 1 << 20  # up to this many in all (a pack keeps buffers per thread, and its direction until backward)
_CHUNK = 1 << 18  # elements per chunk of a large weight: the chunk stays in the CPU cache


class _Group(NamedTuple):
    """Packed stretches of one shape ``(rows, columns)``, ``rows + pad`` rows apart in the pack.

    A member is ``(weight, first row)`` of the weight's matrix: a whole small weight, or the rows
    after the last whole block of a large one."""

    members: tuple[tuple[int, int], ...]
    rows: int
    columns: int
    pad: int  # zero rows after each member, up to a whole number of blocks


class _Pack:
    """Small stretches of plain weights (one population, not transposed) in one flat tensor,
    grouped by shape and sorted by column count: each column count is one block view.

    Compared by identity (plans are cached); it keeps a per-thread flat tensor, whose padding
    stays zero, and scratch."""

    def __init__(self, groups: tuple[_Group, ...], views: tuple[View, ...], numel: int) -> None:
        self.groups, self.views, self.numel = groups, views, numel
        self.members = tuple(member for group in groups for member in group.members)
        self.local = threading.local()

    def regions(self, flat: Tensor) -> list[Tensor]:
        """The ``(rows, columns)`` view of every member in a pack-shaped ``flat``, in order."""
        regions, offset = [], 0
        for group in self.groups:
            count, stride = len(group.members), (group.rows + group.pad) * group.columns
            if count == 1:
                regions.append(flat.as_strided((group.rows, group.columns), (group.columns, 1), offset))
            else:
                regions += flat.as_strided((count, group.rows, group.columns), (stride, group.columns, 1), offset).unbind(0)
            offset += count * stride
        return regions

    def fill(self, weights: Sequence[Tensor]) -> tuple[Tensor, _Scratch]:
        """The pack filled from ``weights`` by one copy kernel, and its scratch."""
        first = weights[self.members[0][0]]
        buffers = getattr(self.local, "buffers", None)
        if buffers is None or buffers[0].device != first.device:
            with torch.inference_mode(False):
                flat = torch.zeros(self.numel, dtype=accumulation_dtype(first.dtype), device=first.device)
                buffers = (flat, self.regions(flat), _Scratch(self.views, self.numel, flat.dtype, flat.device))
            self.local.buffers = buffers
        flat, targets, scratch = buffers
        sources = [_stretch(weights[i], row, group) for group in self.groups for i, row in group.members]
        torch._foreach_copy_(targets, sources)
        return flat, scratch


def _stretch(weight: Tensor, first: int, group: _Group) -> Tensor:
    if first == 0 and weight.dim() == 2 and weight.shape[0] == group.rows:
        return weight
    return weight.reshape(-1, group.columns)[first : first + group.rows]


class _Direct(NamedTuple):
    """A large (or not plain) weight, in chunks of whole blocks of its matrix."""

    index: int
    views: tuple[View, ...]
    tail: int  # the first row held by a pack (the matrix's row count when none is)


class _Plan(NamedTuple):
    packs: tuple[_Pack, ...]  # one per accumulation dtype
    direct: tuple[_Direct, ...]


def _chunks(columns: int, runs) -> tuple[View, ...]:
    views = []
    for start, count, length in runs:
        step = max(1, _CHUNK // (length * columns))
        for first in range(0, count, step):
            views.append(((start + first * length) * columns, min(step, count - first), length, columns))
    return tuple(views)


@functools.lru_cache(maxsize=16)
def _plan(shapes: tuple[torch.Size, ...], dtypes: tuple[torch.dtype, ...], layouts: tuple[Layout, ...], group_size: int) -> _Plan:
    """Which stretches are packed and how; computed once per model architecture."""
    small: dict[torch.dtype, dict[tuple[int, int], list[tuple[int, int]]]] = {}
    direct, packed = [], 0
    for i, (shape, dtype, layout) in enumerate(zip(shapes, dtypes, layouts)):
        numel = math.prod(shape)
        if numel == 0:
            continue
        rows = layout.rows(shape)
        columns = numel // rows
        plain = layout == Layout()
        if plain and numel <= _SMALL and packed + numel <= _PACKED:
            small.setdefault(accumulation_dtype(dtype), {}).setdefault((rows, columns), []).append((i, 0))
            packed += numel
            continue
        runs = layout.runs(rows, group_size)
        tail = rows
        if plain and rows % group_size and rows > group_size:  # the short last block goes to a pack
            tail = rows - rows % group_size
            small.setdefault(accumulation_dtype(dtype), {}).setdefault((rows - tail, columns), []).append((i, tail))
            runs = runs[:-1]
        direct.append(_Direct(i, _chunks(columns, runs), tail))
    packs = []
    for by_shape in small.values():
        groups, views, offset = [], [], 0
        for (rows, columns), members in sorted(by_shape.items(), key=lambda item: item[0][::-1]):
            blocks = -(-rows // group_size)
            groups.append(_Group(tuple(members), rows, columns, blocks * group_size - rows))
            blocks *= len(members)
            previous = views[-1] if views else None
            if previous and previous[3] == columns:
                views[-1] = (previous[0], previous[1] + blocks, group_size, columns)
            else:
                views.append((offset, blocks, group_size, columns))
            offset += blocks * group_size * columns
        packs.append(_Pack(tuple(groups), tuple(views), offset))
    return _Plan(tuple(packs), tuple(direct))


def _chunk(m: Tensor, view: View) -> tuple[Tensor, _Scratch]:
    """A chunk of a large weight's matrix as a flat tensor of the accumulation dtype, and scratch."""
    chunk = _blocks(m.view(-1), view).view(-1).to(accumulation_dtype(m.dtype))
    views = ((0, *view[1:]),)
    return chunk, _scratch(views, chunk.numel(), chunk)


class _PenaltySums(torch.autograd.Function):
    """The penalties of all weights as one autograd node.

    Returns ``(magnitude sum, topology sum)``, or with ``scales = (alpha, lam)`` the single
    ``alpha * magnitude + lam * topology``.  A pack computes its gradient direction in the
    forward (its backward is a multiply); large weights recompute theirs chunk by chunk.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, layouts, spec: ChipSpec, power: int, dtype: torch.dtype, scales, gradient: bool, *weights):
        alpha, lam = scales or (1.0, 1.0)
        magnitudes, topologies, saved = [], [], []
        for pack in plan.packs:
            flat, scratch = pack.fill(weights)
            magnitude, topology, difference = _sums(flat, scratch, spec.limit, power)
            magnitudes.append(magnitude)
            topologies.append(topology)
            if not gradient:
                continue
            if scales is None:  # the two directions apart, unscaled
                saved.append(_directions(flat, scratch, difference, power, 1.0, 0.0).clone())
                saved.append(_directions(flat, scratch, difference, power, 0.0, 1.0).clone())
            else:  # one direction: lam * topology's + alpha * magnitude's
                saved.append(_directions(flat, scratch, difference, power, lam, alpha).clone())
        for item in plan.direct:
            m = layouts[item.index].matrix(weights[item.index]).contiguous()
            for view in item.views:
                magnitude, topology, difference = _sums(*_chunk(m, view), spec.limit, power)
                magnitudes.append(magnitude)
                topologies.append(topology)
                saved.append(difference)
        if len(magnitudes) == 1:
            magnitude, topology = magnitudes[0].to(dtype), topologies[0].to(dtype)
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
        scales, spec, power = ctx.scales, ctx.spec, ctx.power
        if scales is None:
            grad_magnitude, grad_topology = grads
        else:
            grad_magnitude, grad_topology = grads[0] * scales[0], grads[0] * scales[1]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formulas themselves
            return (None,) * 7 + _differentiable_gradient(ctx, weights, grad_magnitude, grad_topology)
        needed = ctx.needs_input_grad[7:]
        result: list[Tensor | None] = [None] * count
        tails = {}
        for pack in ctx.plan.packs:
            if scales is None:
                flat = torch.mul(next(saved), grad_topology).addcmul_(next(saved), grad_magnitude)
            else:
                flat = torch.mul(next(saved), grads[0])
            for (i, row), grad in zip(pack.members, pack.regions(flat)):
                grad = grad.to(weights[i].dtype)  # a pack holds every dtype that accumulates in float32
                if row:
                    tails[i] = grad
                elif needed[i]:
                    result[i] = grad.view(weights[i].shape)
        alpha, lam = scales or (1.0, 1.0)
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
                _excess(chunk, scratch, spec.limit)
                out = target if target.dtype == chunk.dtype else None  # straight into the gradient
                if scales is None:
                    topology = _directions(chunk, scratch, difference, power, 1.0, 0.0, out).mul_(grad_topology)
                    if out is None:
                        topology = target.copy_(topology)
                    topology.addcmul_(_directions(chunk, scratch, difference, power, 0.0, 1.0), grad_magnitude)
                else:
                    direction = _directions(chunk, scratch, difference, power, lam, alpha, out).mul_(grads[0])
                    if out is None:
                        target.copy_(direction)
            if i in tails:
                grad[item.tail :].copy_(tails[i])
            result[i] = layout.unmatrix(grad, weights[i].shape)
        return (None,) * 7 + tuple(result)


def _differentiable_gradient(ctx, weights, grad_magnitude, grad_topology) -> tuple[Tensor | None, ...]:
    with torch.enable_grad():
        magnitude, topology = functional.penalty_sums(weights, ctx.layouts, ctx.spec, ctx.power)
        wanted = [i for i, w in enumerate(weights) if w.requires_grad and ctx.needs_input_grad[7 + i]]
        grads = torch.autograd.grad(
            (magnitude, topology), [weights[i] for i in wanted], (grad_magnitude, grad_topology), create_graph=True, allow_unused=True
        )
    result: list[Tensor | None] = [None] * len(weights)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


def penalty_sums(
    weights: Sequence[Tensor], layouts: Sequence[Layout], spec: ChipSpec, power: int, scales: tuple[float, float] | None = None
) -> tuple[Tensor, Tensor] | Tensor:
    """:func:`nwave_param.functional.penalty_sums`, fast: ``(magnitude sum, topology sum)`` over
    ``weights``, differentiable; zero for no elements.  With ``scales = (alpha, lam)``, the one
    tensor ``alpha * magnitude + lam * topology``: one autograd node, so a training step pays no more."""
    dtype = result_dtype(weights)
    if not weights or not any(w.numel() for w in weights):
        zero = torch.zeros((), dtype=dtype, device=weights[0].device if weights else None)
        return (zero, zero.clone()) if scales is None else zero
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        magnitude, topology = functional.penalty_sums(weights, layouts, spec, power)  # the compiler fuses it
        return (magnitude, topology) if scales is None else scales[0] * magnitude + scales[1] * topology
    plan = _plan(tuple(w.shape for w in weights), tuple(w.dtype for w in weights), tuple(layouts), spec.group_size)
    gradient = torch.is_grad_enabled() and any(w.requires_grad for w in weights)  # else skip the directions
    return _PenaltySums.apply(plan, tuple(layouts), spec, power, dtype, scales, gradient, *weights)


