r"""The penalties' fast path: one autograd node for all weights, few passes over each.

:func:`nwave_param.functional.penalty_sums` *defines* the sums, op by op.  Autograd through it
costs a dozen kernels and full-size temporaries per weight; :func:`engine` computes the same
numbers with a hand-written backward that is autograd's own subgradient of the definition:

* topology: :math:`\partial \min(P, Q) / \partial M_{ij}` is ``[M>0]`` where ``P < Q``,
  ``-[M<0]`` where ``Q < P`` and ``sign(M)/2`` on a tie, i.e. ``clamp(sign(M), lo, hi)`` with
  ``(lo, hi)`` = ``(0, 1)``, ``(-1, 0)`` or ``(-1/2, 1/2)`` per block column;
* magnitude: :math:`p\,\mathrm{relu}(|w| - L)^{p-1}\mathrm{sign}(w)` is ``2 * softshrink(w, L)``
  (p = 2) or ``sign(softshrink(w, L))`` (p = 1), exactly zero when ``max |w| <= L``.

Two implementations of that backward:

* :class:`_NativePenalties`, the C kernels of ``_kernels.c`` (see :mod:`nwave_param.native`):
  CPU float32/float64, one read per weight forward, one read and one write backward;
* :class:`_PenaltySums`, torch ops, for everything else (bf16/fp16, other devices, no C
  compiler).  Small weights of one shape and layout are stacked, so 100 small layers cost a
  handful of kernels; the magnitude is skipped when every weight is in range.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import native
from .functional import Penalties, Runs, accumulation_dtype, block_view, limit_in, reference_engine, result_dtype
from .layout import Layout

__all__ = ["engine"]

# Weights up to this many elements are stacked with their equals (a copy, cheap at this size).
_STACK_NUMEL = 1 << 16


class _Group(NamedTuple):
    indices: tuple[int, ...]
    layout: Layout
    runs: Runs


def _groups(weights: Sequence[Tensor], layouts: Sequence[Layout], runs: Sequence[Runs]) -> list[_Group]:
    groups: dict[object, list[int]] = {}
    for i, (weight, layout) in enumerate(zip(weights, layouts)):
        alone = weight.numel() > _STACK_NUMEL or weight.numel() == 0
        key = i if alone else (weight.shape, weight.dtype, weight.device, layout)
        groups.setdefault(key, []).append(i)
    return [_Group(tuple(ix), layouts[ix[0]], runs[ix[0]]) for ix in groups.values()]


def _matrices(group: _Group, weights: Sequence[Tensor]) -> Tensor:
    """``(members, rows, columns)``: a view for one weight, a stacked copy for several."""
    members = [group.layout.matrix(weights[i]) for i in group.indices]
    return members[0].unsqueeze(0) if len(members) == 1 else torch.stack(members)


def _over_limit(x: Tensor, limit: float) -> bool:
    """Whether some ``relu(|w| - limit)`` is not exactly zero (NaN counts as over)."""
    low, high = torch.aminmax(x)
    return not (max(-low.item(), high.item()) <= limit_in(x.dtype, limit))


class _PenaltySums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, groups, limit, power, dtype, *weights):
        magnitude = torch.zeros((), dtype=dtype, device=weights[0].device)
        topology = torch.zeros((), dtype=dtype, device=weights[0].device)
        ctx.choices, ctx.over = [], []
        for group in groups:
            x = _matrices(group, weights)
            acc = accumulation_dtype(x.dtype)
            over = x.numel() > 0 and _over_limit(x, limit)
            if over:
                excess = F.softshrink(x.to(acc), limit).abs_()
                magnitude += (excess.square_() if power == 2 else excess).sum(dtype=dtype)
            choices = []
            for run in group.runs:
                blocks = block_view(x, run)
                positive = blocks.clamp(min=0).sum(2, dtype=acc)
                negative = blocks.clamp(max=0).sum(2, dtype=acc).neg_()
                topology += torch.minimum(positive, negative).sum(dtype=dtype)
                choices.append(torch.sign(negative - positive).unsqueeze(2))  # +1: positives are the minority
            ctx.choices.append(choices)
            ctx.over.append(over)
        ctx.groups, ctx.limit, ctx.power = groups, limit, power
        ctx.save_for_backward(*weights)
        return magnitude, topology

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_magnitude, grad_topology):
        weights = ctx.saved_tensors
        needed = ctx.needs_input_grad[4:]
        grads: list[Tensor | None] = [None] * len(weights)
        for group, choices, over in zip(ctx.groups, ctx.choices, ctx.over):
            if not any(needed[i] for i in group.indices):
                continue
            x = _matrices(group, weights)
            grad = torch.empty_like(x, memory_format=torch.contiguous_format)
            for run, choice in zip(group.runs, choices):
                g = block_view(grad, run)
                torch.sign(block_view(x, run), out=g)
                g.clamp_(choice.sub(1).mul_(0.5).to(g.dtype), choice.add(1).mul_(0.5).to(g.dtype))
            grad.mul_(grad_topology.to(grad.dtype))
            if over:
                excess = F.softshrink(x, ctx.limit)
                if ctx.power == 2:
                    grad.add_(excess, alpha=2 * grad_magnitude.item())
                else:
                    grad.add_(excess.sign_(), alpha=grad_magnitude.item())
            for member, i in enumerate(group.indices):
                grads[i] = group.layout.unmatrix(grad[member], weights[i].shape)
        return (None, None, None, None, *grads)


_NO_SCRATCH = "nwave_param: the C kernel could not allocate its scratch space"


class _Shape(NamedTuple):
    """What the C kernels need to know of one weight, computed once per layout and shape."""

    columns: int
    choices: int  # block columns
    runs: ctypes.Array
    nruns: int


@functools.lru_cache(maxsize=4096)
def _shape(layout: Layout, shape: torch.Size, runs: Runs) -> _Shape:
    columns = layout.matrix(torch.empty(shape, device="meta")).shape[1]
    flat = [n for run in runs for n in run]
    blocks = sum(count for _, count, _ in runs)
    return _Shape(columns, blocks * columns, (ctypes.c_int64 * (len(flat) or 1))(*flat), len(runs))


def _contiguous_matrix(weight: Tensor, layout: Layout) -> Tensor:
    if weight.dim() == 2 and not layout.transposed and weight.is_contiguous():
        return weight  # the common case costs no reshape
    return layout.matrix(weight).contiguous()


class _NativePenalties(torch.autograd.Function):
    """The penalties through the C kernels: one read per weight forward, one read and one write backward.

    Returns ``(magnitude / count, topology / count)``, or with ``scales = (alpha, lam)`` the
    single ``alpha * magnitude / count + lam * topology / count``: one autograd node in all.
    """

    @staticmethod
    def forward(ctx, lib, layouts, shapes, limit, power, dtype, count, scales, *weights):
        magnitude = topology = 0.0
        sums = (ctypes.c_double * 2)()
        choices = torch.empty(sum(shape.choices for shape in shapes), dtype=torch.int8)
        address = choices.data_ptr()
        for weight, layout, shape in zip(weights, layouts, shapes):
            kernel = lib.nwp_forward_f32 if weight.dtype == torch.float32 else lib.nwp_forward_f64
            m = _contiguous_matrix(weight, layout)
            if kernel(m.data_ptr(), shape.columns, shape.runs, shape.nruns, limit, power, address, sums):
                raise MemoryError(_NO_SCRATCH)
            magnitude += sums[0]
            topology += sums[1]
            address += shape.choices
        ctx.lib, ctx.layouts, ctx.shapes, ctx.limit, ctx.power = lib, layouts, shapes, limit, power
        ctx.count, ctx.scales = count, scales
        ctx.save_for_backward(choices, *weights)
        magnitude, topology = magnitude / count, topology / count
        if scales is None:
            return torch.scalar_tensor(magnitude, dtype=dtype), torch.scalar_tensor(topology, dtype=dtype)
        return torch.scalar_tensor(scales[0] * magnitude + scales[1] * topology, dtype=dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_outputs):
        choices, *weights = ctx.saved_tensors
        if ctx.scales is None:
            gm, gt = (g.item() / ctx.count for g in grad_outputs)
        else:
            g = grad_outputs[0].item() / ctx.count
            gm, gt = g * ctx.scales[0], g * ctx.scales[1]
        grads: list[Tensor | None] = []
        address = choices.data_ptr()
        for weight, layout, shape, needed in zip(weights, ctx.layouts, ctx.shapes, ctx.needs_input_grad[8:]):
            if needed:
                kernel = ctx.lib.nwp_backward_f32 if weight.dtype == torch.float32 else ctx.lib.nwp_backward_f64
                m = _contiguous_matrix(weight, layout)
                grad = torch.empty_like(m, memory_format=torch.contiguous_format)
                if kernel(m.data_ptr(), grad.data_ptr(), shape.columns, shape.runs, shape.nruns, address, ctx.limit, ctx.power, gm, gt):
                    raise MemoryError(_NO_SCRATCH)
                grads.append(grad if m is weight else layout.unmatrix(grad, weight.shape))
            else:
                grads.append(None)
            address += shape.choices
        return (None,) * 8 + tuple(grads)


def _native_ok(weight: Tensor) -> bool:
    return weight.is_cpu and weight.dtype in (torch.float32, torch.float64) and weight.numel() > 0


def _torch_sums(weights, layouts, runs, limit, power) -> tuple[Tensor, Tensor]:
    """:func:`nwave_param.functional.penalty_sums` through :class:`_PenaltySums`."""
    dtype = result_dtype(weights)
    if not weights:
        zero = torch.zeros((), dtype=dtype)
        return zero, zero.clone()
    return _PenaltySums.apply(_groups(weights, layouts, runs), limit, power, dtype, *weights)


def engine(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    runs: Sequence[Runs],
    limit: float,
    power: int,
    count: int,
    scales: tuple[float, float] | None = None,
) -> Penalties | Tensor:
    """Drop-in for :func:`nwave_param.functional.reference_engine`: same values, same gradients.

    CPU float32/float64 weights go through the C kernels when they could be built (one autograd
    node in all); the rest (half precision, other devices, no compiler) through torch ops.
    """
    lib = native.library()
    if lib is not None and weights and all(map(_native_ok, weights)):
        shapes = tuple(map(_shape, layouts, [w.shape for w in weights], runs))
        result = _NativePenalties.apply(lib, layouts, shapes, limit, power, result_dtype(weights), count, scales, *weights)
        return result if scales is not None else Penalties(*result)
    return reference_engine(weights, layouts, runs, limit, power, count, scales, sums=_torch_sums)
