"""The engine's hardening: the values the network computes with, for all weights at once.

:func:`harden_all` is :func:`nwave_param.functional.harden` of every weight of a pass, equal to
it bit for bit: small weights projected together in their pack (a dozen kernels, a few more for
the grid), large ones on the CPU chunk by chunk, and one straight-through autograd node for all.
What it leaves in the packs (:class:`Shared`) the penalty of the same pass reuses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from nwave_param import functional
from nwave_param._engine.penalties import _assembled, _in, _raw_parts
from nwave_param._memo import memoized
from nwave_param._engine.plans import Direct, Member, Pack, Scratch, blocks, chunk, plan_for
from nwave_param.functional import accumulation_dtype, bound
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["Shared", "harden_all"]


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
        _raw_parts(flat, scratch)
    if spec.bits is None:
        torch.clamp(flat, 0, top, out=rows[2])  # the positive side, in range: its sum is P
        torch.clamp(flat, -top, 0, out=rows[3])  # the negative side: its sum is -Q
        scratch.sum_parts(slice(0, 4) if raw else Scratch.HELD)
        sides = [(blocks[2], blocks[3]) for blocks in scratch.row_blocks]
    else:
        if raw:
            scratch.sum_parts(Scratch.RAW)
        held, kept, gain, side, *work = scratch.workspace(9)
        torch.clamp(flat, -top, top, out=held)
        if _scale_fits(spec, flat.dtype):
            _round_to_grid_(held, spec, dtype, work, scratch.workspace(2, torch.int32))
        else:  # a grid step under the compute dtype's range (limit=1e-38): the definition's own table lookup
            held.copy_(functional.round_to_grid(held, spec, dtype))
        torch.abs(held, out=kept)
        torch.sub(kept, torch.abs(flat, out=gain), out=gain).clamp_(min=0)
        torch.sub(kept, gain, alpha=2, out=gain)  # |w| - |w - q(w)| = kept - 2 (kept - |w|)+ (doubling is exact)
        torch.sign(held, out=side)  # its gain counts on its side: P from the positives, -Q from the negatives
        torch.clamp(side, min=0, out=rows[2]).mul_(gain)
        torch.clamp(side, max=0, out=rows[3]).mul_(gain)
        scratch.sum_parts(Scratch.HELD)
        positive, negative = torch.clamp(held, min=0, out=kept), torch.clamp(held, max=0, out=gain)
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
    levels = _level_table(spec, dtype, x.dtype, x.device)
    k0, near, far, level0, level1 = work
    index, step = indices
    torch.mul(x, spec.levels / spec.limit, out=k0).round_()  # x / step need not be exact: it only picks the pair
    index.copy_(torch.nan_to_num(k0, 0.0, out=near).add_(spec.levels))
    torch.index_select(levels, 0, index, out=level0)
    step.copy_(torch.sub(x, level0, out=near).sign_().nan_to_num_(0.0))
    torch.index_select(levels, 0, index.add_(step).clamp_(0, 2 * spec.levels), out=level1)
    distance0, distance1 = torch.sub(x, level0, out=near).abs_(), torch.sub(x, level1, out=far).abs_()
    nearer = torch.sub(distance0, distance1, out=near).sign_()  # 1: level1 is nearer; 0: a tie (or one level)
    odd = torch.sub(k0, torch.mul(k0, 0.5, out=far).round_().mul_(2), out=far).abs_()  # k0 odd: then k1 is the even one
    choice = torch.clamp(nearer, min=0, out=k0).add_(nearer.abs_().neg_().add_(1).mul_(odd))
    return torch.copysign(level1.sub_(level0).mul_(choice).add_(level0), x, out=x)


def _scale_fits(spec: ChipSpec, compute: torch.dtype) -> bool:
    """Whether ``x * (levels / limit)``, the grid index :func:`_round_to_grid_` starts from, is
    finite in ``compute``: not for a limit so small that the step underflows it."""
    return spec.levels / spec.limit <= torch.finfo(compute).max


@memoized(64)
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
                shared.fills[id(pack)] = pack.local.fills
            if hardness != 1 or noise_scale or dtype != flat.dtype:  # in the weights' dtype, as the definition computes
                drawn = _gaussian(_in(dtype, flat), noise_scale) if noise_scale else None  # once for the pack
                per_view = [
                    _hardened(_in(dtype, target), _in(dtype, blocks(flat, view)), hardness, None if drawn is None else blocks(drawn, view))
                    for target, view in zip(per_view, pack.views)
                ]
        pieces: dict[int, list[tuple[Member, Tensor]]] = {}
        for member, region in zip(pack.members, pack.regions_of_views(per_view)):
            if member.index in direct:
                tails.setdefault(member.index, []).append((member, region))
            elif member.index in pack.whole:
                values[member.index] = region
            else:
                pieces.setdefault(member.index, []).append((member, region))
        for i, parts in pieces.items():
            values[i] = _assembled(weights[i], parts)
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
    weight: Tensor, layout: Layout, item: Direct, tails: Sequence[tuple[Member, Tensor]], spec: ChipSpec, hardness: float, noise_scale: float
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
            drawn = _gaussian(_in(weight.dtype, projected), noise_scale) if noise_scale else None
            target.copy_(_hardened(_in(weight.dtype, projected), _in(weight.dtype, blocks(flat, scratch.views[0])), hardness, drawn))
    for _, tail in tails:
        value[item.tail :].copy_(tail.reshape(-1, value.shape[1]))
    return layout.unmatrix(value, weight.shape)


def _hardened(target: Tensor, latent: Tensor, hardness: float, noise: Tensor | None) -> Tensor:
    """``w + h (project(w) - w)`` plus ``h`` times the noise, op for op as :func:`functional.harden` computes it."""
    value = target if hardness == 1 else latent + hardness * (target - latent)
    if noise is not None:  # value is new (target is made per call): the noise goes into it
        value.add_(noise if hardness == 1 else hardness * noise)
    return value


def _gaussian(like: Tensor, std: float) -> Tensor:
    """Mismatch noise shaped like ``like``: what ``ChipConstraint`` draws for one weight, drawn
    here once for a whole pack."""
    return torch.randn_like(like).mul_(std)
