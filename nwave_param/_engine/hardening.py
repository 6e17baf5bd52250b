"""The engine's hardening: the values the network computes with, for all weights of a pass at once.

:func:`harden_all` is :func:`nwave_param.functional.harden` of every weight: small weights
projected together in their pack (a dozen kernels, a few more for the grid), large ones on the
CPU chunk by chunk, and one straight-through autograd node for all.  With a
:class:`~nwave_param._engine.plans.Shared`, it also leaves the penalty's parts and sums in the
packs, for :func:`~nwave_param._engine.penalties.penalty_sums` of the same pass to reuse.

Exactness, as the tests hold it: everything here is bit for bit the definition's, nothing only
within a tolerance.

* :func:`harden_all` returns the bytes :func:`nwave_param.functional.harden` returns (``-0.0``
  apart from ``0.0``), given the same noise: for float64, float32, float16 and bfloat16 weights,
  with and without a grid, at any hardness in ``[0, 1]``, with no, given or drawn noise, on every
  route a plan takes and for any memory layout of a weight (``tests/test_fast_path.py``,
  ``tests/test_strides.py``, ``tests/test_hardness.py``), and at the ends of each dtype's range
  (``tests/test_quantization.py``).  At hardness 1 the value is the projection, so through those
  tests :func:`_chip_pack` is :func:`nwave_param.functional.project` and :func:`_round_to_grid_`
  is :func:`nwave_param.functional.round_to_grid`, bit for bit.
* The gradient reaching each weight is the incoming one, unchanged (``torch.equal``).
* Drawn noise is drawn once per pack or chunk (:func:`_gaussian`), not per weight: the noise
  each weight received is the definition's input, not the random stream.
* The penalty reading the parts and sums left in the packs equals, bit for bit, the penalty
  computing them itself (``tests/test_penalty_properties.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nwave_param import functional
from nwave_param._engine.plans import Direct, Member, Scratch, Shared, assembled, blocks, chunk, in_dtype, plan_for, raw_parts
from nwave_param._memo import memoized
from nwave_param.functional import accumulation_dtype, bound
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["harden_all"]


class _StraightThrough(torch.autograd.Function):
    """Returns ``values`` (a list, so that autograd does not track them as inputs); passes each
    one's gradient to its weight unchanged: one node for all the weights of a pass."""

    @staticmethod
    def forward(ctx, values: list[Tensor], *weights: Tensor) -> tuple[Tensor, ...]:
        return tuple(values)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *grads)


def _chip_pack(flat: Tensor, scratch: Scratch, dtype: torch.dtype, spec: ChipSpec, raw: bool, out: Tensor | None = None) -> list[Tensor]:
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
        raw_parts(flat, scratch)
    if spec.bits is None:
        torch.clamp(flat, 0, top, out=rows[2])  # the positive side, in range: its sum is P
        torch.clamp(flat, -top, 0, out=rows[3])  # the negative side: its sum is -Q
        scratch.sum_parts(slice(0, 4) if raw else Scratch.HELD)
        sides = [(view_rows[2], view_rows[3]) for view_rows in scratch.row_blocks]
    else:
        if raw:
            scratch.sum_parts(Scratch.RAW)
        # kept_buffer holds |q(w)|, then the positive side; gain_buffer |w|, (|q(w)| - |w|)+, the gain, then the negative side
        held, kept_buffer, gain_buffer, side, *work = scratch.workspace(9)
        torch.clamp(flat, -top, top, out=held)
        if _scale_fits(spec, flat.dtype):
            _round_to_grid_(held, spec, dtype, work, scratch.workspace(2, torch.int32))
        else:  # a grid step under the compute dtype's range (limit=1e-38): the definition's own table lookup
            held.copy_(functional.round_to_grid(held, spec, dtype))
        kept = torch.abs(held, out=kept_buffer)
        overshoot = torch.sub(kept, torch.abs(flat, out=gain_buffer), out=gain_buffer).clamp_(min=0)
        gain = torch.sub(kept, overshoot, alpha=2, out=gain_buffer)  # |w| - |w - q(w)| = kept - 2 (kept - |w|)+ (doubling is exact)
        torch.sign(held, out=side)  # its gain counts on its side: P from the positives, -Q from the negatives
        torch.clamp(side, min=0, out=rows[2]).mul_(gain)
        torch.clamp(side, max=0, out=rows[3]).mul_(gain)
        scratch.sum_parts(Scratch.HELD)
        positive, negative = torch.clamp(held, min=0, out=kept_buffer), torch.clamp(held, max=0, out=gain_buffer)
        sides = [(blocks(positive, view), blocks(negative, view)) for view in scratch.views]
    # keep the positive side where P >= Q, as the definition compares them (P - Q >= 0 agrees but
    # where both sums overflow: inf - inf is NaN)
    scratch.keep.copy_(torch.ge(scratch.sum_rows[2], torch.neg(scratch.sum_rows[3], out=scratch.negated), out=scratch.kept))
    torch.sub(scratch.one, scratch.keep, out=scratch.drop)
    return [
        torch.mul(positive_blocks, keep, out=out).addcmul_(negative_blocks, drop)  # ``out``: a chunk's one view
        for (positive_blocks, negative_blocks), keep, drop in zip(sides, scratch.keep_blocks, scratch.drop_blocks)
    ]


def _round_to_grid_(x: Tensor, spec: ChipSpec, dtype: torch.dtype, work: list[Tensor], indices: list[Tensor]) -> Tensor:
    """:func:`functional.round_to_grid` of ``x``, in place, in float arithmetic and two table
    lookups (its ``bucketize`` and gather run a scalar loop per element on the CPU): bit for bit
    the same.  ``work`` holds five float and ``indices`` two int32 tensors like ``x``, for the
    temporaries.

    ``k0 = round(x / step)`` is the nearest ideal level; the held levels sit up to half an ulp off
    ``k * step``, so the nearest held one is ``k0``'s or its neighbour's on ``x``'s side, whichever
    is nearer, the even ``k`` on a tie.  The distances are exact wherever they decide: ``x`` is
    within a factor of two of the level it is compared with (Sterbenz), or the comparison is with a
    threshold the rounding cannot cross.  A NaN looks up level 0, then stays NaN."""
    table = _level_table(spec, dtype, x.dtype, x.device)
    # The buffers, each holding the quantities named below in turn (in place, for speed):
    #   k_buffer:      k0, then the choice (1: level1, 0: level0)
    #   temp_a:        k0's table index, the side of level0 that x is on, |x - level0|,
    #                  sign(|x - level0| - |x - level1|), then the tie term
    #   temp_b:        |x - level1|, then 2 round(k0 / 2), then k0's parity (1: odd)
    #   level0_buffer: level0
    #   level1_buffer: level1, then level1 - level0, then the nearest level
    #   table_index (int32): level0's index in the table, then level1's
    #   side_step (int32): the side, -1, 0 or 1
    k_buffer, temp_a, temp_b, level0_buffer, level1_buffer = work
    table_index, side_step = indices
    k0 = torch.mul(x, spec.levels / spec.limit, out=k_buffer).round_()  # x / step need not be exact: it only picks the pair
    index0 = torch.nan_to_num(k0, 0.0, out=temp_a).add_(spec.levels)  # level k0's place in the table (a NaN's: level 0's)
    table_index.copy_(index0)
    level0 = torch.index_select(table, 0, table_index, out=level0_buffer)
    side = torch.sub(x, level0, out=temp_a).sign_().nan_to_num_(0.0)  # where the neighbour is (0: x is level0, or NaN)
    side_step.copy_(side)
    level1 = torch.index_select(table, 0, table_index.add_(side_step).clamp_(0, 2 * spec.levels), out=level1_buffer)
    distance0, distance1 = torch.sub(x, level0, out=temp_a).abs_(), torch.sub(x, level1, out=temp_b).abs_()
    nearer = torch.sub(distance0, distance1, out=temp_a).sign_()  # 1: level1 is nearer; 0: a tie (or one level)
    even_k = torch.mul(k0, 0.5, out=temp_b).round_().mul_(2)  # 2 round(k0 / 2): k0 when even, a neighbour when odd
    odd = torch.sub(k0, even_k, out=temp_b).abs_()  # 1 where k0 is odd: then level1's k is the even one
    level1_nearer = torch.clamp(nearer, min=0, out=k_buffer)  # read nearer before the next line overwrites it
    tie_to_level1 = nearer.abs_().neg_().add_(1).mul_(odd)  # 1 on a tie where level1's k is even
    choice = level1_nearer.add_(tie_to_level1)
    gap = level1.sub_(level0)
    nearest = gap.mul_(choice).add_(level0)
    return torch.copysign(nearest, x, out=x)


def _scale_fits(spec: ChipSpec, compute: torch.dtype) -> bool:
    """Whether ``x * (levels / limit)``, the grid index :func:`_round_to_grid_` starts from, is
    finite in ``compute``: not for a limit so small that the step underflows it."""
    return spec.levels / spec.limit <= torch.finfo(compute).max


@memoized(64)
def _level_table(spec: ChipSpec, dtype: torch.dtype, compute: torch.dtype, device: torch.device) -> Tensor:
    """The grid's levels as ``dtype`` holds them (the definition's table), in ``compute``."""
    with torch.inference_mode(False):
        return functional.levels(spec, dtype, device).to(compute)


def harden_all(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    spec: ChipSpec,
    hardness: float,
    noise: float | Sequence[Tensor | None] = 0.0,
    shared: Shared | None = None,
) -> list[Tensor]:
    """:func:`functional.harden` of every weight, computed together: ``w + h (project(w) - w)``
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
    direct = {item.index: item for item in plan.direct}  # large weights on the CPU: in chunks, below
    raw = shared is not None and torch.is_grad_enabled() and not direct  # training: the penalty will read the same packs
    noise_scale = noise if isinstance(noise, float) else 0.0
    if raw:
        shared.read(weights)
    tails: dict[int, list[tuple[Member, Tensor]]] = {}  # the short last blocks of large weights, packed
    for pack in plan.packs:
        dtype = weights[pack.members[0].index].dtype
        with torch.no_grad():
            flat, scratch = pack.fill(weights)
            per_view = _chip_pack(flat, scratch, dtype, spec, raw)
            if raw:
                shared.filled(pack)
            if hardness != 1 or noise_scale or dtype != flat.dtype:  # in the weights' dtype, as the definition computes
                drawn = _gaussian(flat, noise_scale, dtype) if noise_scale else None  # once for the pack
                hardened = []
                for target, view in zip(per_view, pack.views):
                    chip, latent = in_dtype(dtype, target), in_dtype(dtype, blocks(flat, view))
                    hardened.append(_hardened(chip, latent, hardness, None if drawn is None else blocks(drawn, view)))
                per_view = hardened
        pieces: dict[int, list[tuple[Member, Tensor]]] = {}
        for member, region in zip(pack.members, pack.regions_of_views(per_view)):
            if member.index in direct:
                tails.setdefault(member.index, []).append((member, region))
            elif member.index in pack.whole:
                values[member.index] = region
            else:
                pieces.setdefault(member.index, []).append((member, region))
        for i, parts in pieces.items():
            values[i] = assembled(weights[i], parts)
    for i, item in direct.items():
        with torch.no_grad():
            values[i] = _hardened_in_chunks(weights[i], layouts[i], item, tails.get(i, ()), spec, hardness, noise_scale)
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


def _hardened_in_chunks(
    weight: Tensor,
    layout: Layout,
    item: Direct,
    tails: Sequence[tuple[Member, Tensor]],
    spec: ChipSpec,
    hardness: float,
    noise_scale: float,
) -> Tensor:
    """A large weight on the CPU hardened chunk by chunk, in the thread's reused chunk scratch (a
    scratch of the weight's own size would page in fresh memory on every call); its short last
    block, if any, comes hardened from a pack (``tails``)."""
    m = layout.matrix(weight).contiguous()
    value = torch.empty_like(m)
    direct_out = hardness == 1 and not noise_scale and accumulation_dtype(weight.dtype) == weight.dtype  # projected straight into it
    for view in item.views:
        flat, scratch = chunk(m, view)
        target = blocks(value.view(-1), view)
        (projected,) = _chip_pack(flat, scratch, weight.dtype, spec, False, target if direct_out else None)
        if not direct_out:
            chip, latent = in_dtype(weight.dtype, projected), in_dtype(weight.dtype, blocks(flat, scratch.views[0]))
            drawn = _gaussian(chip, noise_scale) if noise_scale else None
            target.copy_(_hardened(chip, latent, hardness, drawn))
    for _, tail in tails:
        value[item.tail :].copy_(tail.reshape(-1, value.shape[1]))
    return layout.unmatrix(value, weight.shape)


def _hardened(target: Tensor, latent: Tensor, hardness: float, noise: Tensor | None) -> Tensor:
    """``w + h (project(w) - w)`` plus ``h`` times the noise, op for op as :func:`functional.harden` computes it."""
    value = target if hardness == 1 else latent + hardness * (target - latent)
    if noise is not None:  # value is new (target is made per call): the noise goes into it
        value.add_(noise if hardness == 1 else hardness * noise)
    return value


def _gaussian(like: Tensor, std: float, dtype: torch.dtype | None = None) -> Tensor:
    """Mismatch noise shaped like ``like`` (in ``dtype``, default its own): what ``ChipConstraint``
    draws for one weight, drawn here once for a whole pack; ``like`` is not cast, only its shape read."""
    return torch.randn_like(like, dtype=dtype).mul_(std)
