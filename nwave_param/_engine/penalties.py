"""The engine's penalties: the magnitude and topology sums of all tracked weights at once, as one
autograd node, in few kernels (how the work is laid out: :mod:`.plans`; the hardened values:
:mod:`.hardening`).

:func:`penalty_sums` computes :func:`nwave_param.functional.penalty_sums`, and its gradient is
autograd's own subgradient of those formulas (ties and exact zeros included), written out: a pack
computes its gradient direction in the forward, and its backward is one multiply.  Inside
``torch.compile`` and ``torch.func`` transforms the definitions are traced as written, and a
double backward differentiates them too.  The hot path is float arithmetic only: on the CPU,
kernels of boolean masks and ``where`` run ten to twenty times slower, and each view or small op
costs microseconds of dispatch.

Exactness, as the tests hold it:

* Against the definition, within a tolerance, not bit for bit (the sums add in another order:
  per block column in a pack or chunk, then over packs and chunks).  The sums and the gradients
  agree with :func:`nwave_param.functional.penalty_sums` and autograd's gradient of it within
  ``torch.testing.assert_close``'s default tolerances for float32 and float64 weights (float32:
  ``rtol=1.3e-6, atol=1e-5``; float64: ``rtol=1e-7, atol=1e-7``), and within ``rtol=1e-2,
  atol=1e-3`` for float16 and bfloat16 weights (``tests/test_fast_path.py`` on every route,
  ``tests/test_strides.py``; ``tests/test_penalty_properties.py`` against float64 formulas
  written out in ``tests/reference.py``, default tolerances).  A float32 weight of 2,000,000 rows
  sums to within ``1e-6`` relative of the float64 definition.  The double backward and
  ``torch.func`` results are the definition's own, compared with the default tolerances.
* Bit for bit: the penalty and its gradients inside a cached pass (reading what the hardening
  left, :class:`~nwave_param._engine.plans.Shared`) equal those computed outside it
  (``tests/test_penalty_properties.py``), and threads computing at once get what one thread
  does (``tests/test_robustness.py``), both compared with ``torch.equal``.
* Exact values: on a tie ``P = Q`` the topology's gradient is ``sign(w) / 2`` and at an exact
  zero it is 0, as autograd's (``tests/test_fast_path.py`` compares them with ``==``).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, islice
from typing import NamedTuple

import torch
from torch import Tensor

from nwave_param import functional
from nwave_param._engine.plans import Member, Plan, Scratch, Shared, assembled, blocks, chunk, in_dtype, plan_for, raw_parts
from nwave_param._memo import memoized
from nwave_param.functional import result_dtype
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["PenaltyConfig", "penalty_sums"]


def _sums(flat: Tensor, scratch: Scratch, limit: float, power: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(magnitude, topology, P - Q per block column)`` from ``sums[RAW]`` (P, and -Q); leaves
    ``w - clamp(w)`` in ``scratch.excess``."""
    positive, negative = scratch.sum_rows[0], scratch.sum_rows[1]
    excess = _excess(flat, scratch, limit)
    magnitude = torch.dot(excess, excess) if power == 2 else excess.abs().sum()
    topology = torch.minimum(positive, torch.neg(negative, out=scratch.negated), out=scratch.lowest).sum()
    return magnitude, topology, torch.add(positive, negative, out=scratch.difference)


@memoized(64)
def _bound_terms(scale: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(c0, c1)``: the topology gradient's clamp per block column is ``c0 + c1 * sign(P - Q)``,
    that is ``[high - scale, high]`` with ``high = scale (1 - sign(P - Q)) / 2``."""
    with torch.inference_mode(False):
        half = 0.5 * scale
        return torch.tensor([[-half], [half]], dtype=dtype, device=device), torch.tensor([[-half], [-half]], dtype=dtype, device=device)


def _directions(
    flat: Tensor, scratch: Scratch, difference: Tensor, power: int, alpha: float, lam: float, out: Tensor | None = None
) -> list[Tensor]:
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


def _excess(flat: Tensor, scratch: Scratch, limit: float) -> Tensor:
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


class _Saved(NamedTuple):
    """What the forward keeps for the backward.  ``save_for_backward`` takes one flat sequence of
    tensors: :meth:`save` lays these fields out in their order (the weights, then each pack's
    directions, then each large weight's chunk differences) and :meth:`of` reads them back."""

    weights: tuple[Tensor, ...]  # the node's weight inputs, one per layout
    # per pack of plan.packs, one tensor per view of the pack: with scales, alpha * the magnitude's
    # direction + lam * the topology's; without, the magnitude's of every view, then the topology's;
    # none when the forward computed no gradient
    directions: list[list[Tensor]]
    differences: list[list[Tensor]]  # per large weight of plan.direct: P - Q per block column of each chunk, in chunk order

    def save(self, ctx) -> None:
        ctx.saved_counts = ([len(d) for d in self.directions], [len(d) for d in self.differences])
        ctx.save_for_backward(*self.weights, *chain.from_iterable(self.directions), *chain.from_iterable(self.differences))

    @staticmethod
    def of(ctx) -> _Saved:
        tensors = iter(ctx.saved_tensors)
        direction_counts, difference_counts = ctx.saved_counts
        weights = tuple(islice(tensors, len(ctx.layouts)))
        return _Saved(weights, [list(islice(tensors, n)) for n in direction_counts], [list(islice(tensors, n)) for n in difference_counts])


class _PenaltySums(torch.autograd.Function):
    """The penalties of all weights as one autograd node.

    Returns ``(magnitude sum, topology sum)``, or with ``scales = (alpha, lam)`` the single
    ``alpha * magnitude + lam * topology``.  A pack computes its gradient direction in the
    forward (its backward is a multiply); large weights keep only ``P - Q`` per block column of
    each chunk and recompute their directions chunk by chunk.  What the forward saves, and in
    which order, is :class:`_Saved`.
    """

    @staticmethod
    def forward(ctx, config: PenaltyConfig, *weights):
        plan, layouts, spec, power, dtype, scales, gradient, shared = config
        alpha, lam = scales or (1.0, 1.0)
        magnitudes, topologies = [], []
        directions: list[list[Tensor]] = []  # per pack
        differences: list[list[Tensor]] = []  # per large weight
        for pack in plan.packs:
            if shared is not None and shared.holds(pack, weights):  # filled, and summed, by this pass's hardening
                buffers = pack.local.buffers
                flat, scratch = buffers.flat, buffers.scratch
            else:
                flat, scratch = pack.fill(weights)
                raw_parts(flat, scratch)
                scratch.sum_parts(Scratch.RAW)
            magnitude, topology, difference = _sums(flat, scratch, spec.limit, power)
            magnitudes.append(magnitude)
            topologies.append(topology)
            if not gradient:
                directions.append([])
            elif scales is None:  # the two directions apart, unscaled
                magnitude_directions = _directions(flat, scratch, difference, power, 1.0, 0.0)
                directions.append(magnitude_directions + _directions(flat, scratch, difference, power, 0.0, 1.0))
            else:  # one direction: alpha * magnitude's + lam * topology's
                directions.append(_directions(flat, scratch, difference, power, alpha, lam))
        for item in plan.direct:
            m = layouts[item.index].matrix(weights[item.index]).contiguous()
            chunk_differences = []
            for view in item.views:
                flat, scratch = chunk(m, view)
                raw_parts(flat, scratch)
                scratch.sum_parts(Scratch.RAW)
                magnitude, topology, difference = _sums(flat, scratch, spec.limit, power)
                magnitudes.append(magnitude)
                topologies.append(topology)
                chunk_differences.append(difference.clone())  # its scratch is reused by the next chunk
            differences.append(chunk_differences)
        if len(magnitudes) == 1:
            magnitude, topology = in_dtype(dtype, magnitudes[0]), in_dtype(dtype, topologies[0])
        else:
            magnitude, topology = torch.stack(magnitudes).sum().to(dtype), torch.stack(topologies).sum().to(dtype)
        ctx.plan, ctx.layouts, ctx.spec, ctx.power, ctx.scales = plan, layouts, spec, power, scales
        _Saved(weights, directions, differences).save(ctx)
        if scales is None:
            return magnitude, topology
        return torch.add(topology * lam, magnitude, alpha=alpha)

    @staticmethod
    def backward(ctx, *grads):
        """Each weight's gradient: a pack's saved directions times the incoming gradients; a large
        weight's directions recomputed chunk by chunk from its saved differences (:class:`_Saved`)."""
        saved = _Saved.of(ctx)
        weights, count = saved.weights, len(saved.weights)
        needed = ctx.needs_input_grad[len(ctx.needs_input_grad) - count:]  # the weights are the last inputs
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formulas themselves
            return (None, *_differentiable_gradient(ctx, weights, needed, *_scaled(ctx.scales, grads)))
        result: list[Tensor | None] = [None] * count
        pieces: dict[int, list[tuple[Member, Tensor]]] = {}  # the members' gradients of weights that are not one region
        for pack, pack_directions in zip(ctx.plan.packs, saved.directions):
            if ctx.scales is None:
                grad_magnitude, grad_topology = grads
                magnitude_directions, topology_directions = pack_directions[: len(pack.views)], pack_directions[len(pack.views) :]
                per_view = [
                    torch.mul(d, grad_magnitude).addcmul_(t, grad_topology) for d, t in zip(magnitude_directions, topology_directions)
                ]
            else:
                per_view = [torch.mul(d, grads[0]) for d in pack_directions]
            for member, whole, grad in zip(pack.members, pack.is_weight, pack.regions_of_views(per_view)):
                i = member.index
                if not needed[i]:
                    continue
                if whole:  # its region is the weight's gradient (a pack holds every dtype that accumulates in float32)
                    result[i] = in_dtype(weights[i].dtype, grad)
                else:
                    pieces.setdefault(i, []).append((member, grad))
        direct = {item.index: item for item in ctx.plan.direct}
        for i, member_grads in pieces.items():
            if i not in direct:  # a weight of several members: its gradient assembled from them
                result[i] = assembled(weights[i], member_grads)
        alpha, lam = ctx.scales or (1.0, 1.0)
        for item, chunk_differences in zip(ctx.plan.direct, saved.differences):
            i, layout = item.index, ctx.layouts[item.index]
            if not needed[i]:
                continue
            m = layout.matrix(weights[i]).contiguous()
            grad = torch.empty_like(m)
            for view, difference in zip(item.views, chunk_differences):
                part, scratch = chunk(m, view)
                target = blocks(grad.view(-1), view).view(-1)
                _excess(part, scratch, ctx.spec.limit)
                out = target if target.dtype == part.dtype else None  # straight into the gradient
                if ctx.scales is None:
                    grad_magnitude, grad_topology = grads
                    (topology,) = _directions(part, scratch, difference, ctx.power, 0.0, 1.0, out)
                    topology.mul_(grad_topology)
                    if out is None:
                        topology = target.copy_(topology.view(-1))
                    (magnitude,) = _directions(part, scratch, difference, ctx.power, 1.0, 0.0)
                    topology.view(magnitude.shape).addcmul_(magnitude, grad_magnitude)
                else:
                    (direction,) = _directions(part, scratch, difference, ctx.power, alpha, lam, out)
                    direction.mul_(grads[0])
                    if out is None:
                        target.copy_(direction.view(-1))
            for _, tail in pieces.get(i, ()):  # the short last block came from a pack
                grad[item.tail :].copy_(tail.reshape(-1, grad.shape[1]))
            result[i] = layout.unmatrix(grad, weights[i].shape)
        return (None, *result)


def _scaled(scales, grads) -> tuple[Tensor, Tensor]:
    """``(grad_magnitude, grad_topology)`` from the backward's incoming gradients."""
    if scales is None:
        return grads
    alpha, lam = scales
    return grads[0] * alpha, grads[0] * lam


def _differentiable_gradient(ctx, weights, needed, grad_magnitude, grad_topology) -> tuple[Tensor | None, ...]:
    with torch.enable_grad():
        magnitude, topology = functional.penalty_sums(weights, ctx.layouts, ctx.spec, ctx.power)
        wanted = [i for i, w in enumerate(weights) if w.requires_grad and needed[i]]
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
    more.  ``shared``: what :func:`~nwave_param._engine.hardening.harden_all` left of the same
    weights in this pass, reused."""
    dtype = result_dtype(weights)
    if not weights or not any(w.numel() for w in weights):
        zero = torch.zeros((), dtype=dtype, device=weights[0].device if weights else None)
        return (zero, zero.clone()) if scales is None else zero
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        magnitude, topology = functional.penalty_sums(weights, layouts, spec, power)  # the compiler fuses it
        return (magnitude, topology) if scales is None else scales[0] * magnitude + scales[1] * topology
    plan = plan_for(weights, layouts, spec.group_size)
    gradient = torch.is_grad_enabled() and any(w.requires_grad for w in weights)  # else skip the directions
    return _PenaltySums.apply(PenaltyConfig(plan, tuple(layouts), spec, power, dtype, scales, gradient, shared), *weights)

