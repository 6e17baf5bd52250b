r"""The chip-constraint math, as pure functions on tensors.

A weight is read as its connectivity matrix ``M`` (:class:`~nwave_param.layout.Layout`: rows =
output neurons, columns = inputs), whose rows are cut into blocks of ``spec.group_size``.  For
the rows ``i`` of block ``b`` and column ``j``:

* magnitude :math:`= \sum_w \mathrm{relu}(|w| - \text{limit})^{p}`, :math:`p \in \{1, 2\}`;
* topology :math:`= \sum_{b, j} \min(P_{bj}, Q_{bj})`, :math:`P_{bj} = \sum_{i \in b} \mathrm{relu}(M_{ij})`,
  :math:`Q_{bj} = \sum_{i \in b} \mathrm{relu}(-M_{ij})`: the L1 distance from block column
  ``(b, j)`` to the nearest sign-aligned one;
* the chip holds :func:`project` ``(w)``: the L1-nearest point that is in range, sign-aligned and
  (with ``spec.bits``) on the grid;
* hardening computes with :func:`harden` ``(w) = w + h (project(w) - w)``, straight through.

Sums are taken in float32 (float64 for float64 weights), so half-precision weights accumulate
safely, and the limit is read as that dtype holds it, as torch does when it compares a tensor
with a Python number.

These are the definitions.  The engine (:mod:`nwave_param._engine`) computes the same numbers for
many weights at once in few kernels, and the tests hold it to these functions: its hardened and
projected values bit for bit; its penalty sums within a stated tolerance, as they add in another
order (:mod:`nwave_param._engine.penalties` says which).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from nwave_param._memo import memoized
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = [
    "PenaltyTerms",
    "accumulation_dtype",
    "block_view",
    "bound",
    "grouping",
    "harden",
    "levels",
    "mixed_blocks",
    "off_grid",
    "penalty_sums",
    "project",
    "result_dtype",
    "unprojectable",
    "weight_sums",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32.

    Args:
        dtype: a weight's dtype.

    Returns:
        The dtype its sums are taken in.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(weights: Sequence[Tensor]) -> torch.dtype:
    """float64 if any weight is float64, else float32: the dtype of the penalties.

    Args:
        weights: the weights the penalties sum over.

    Returns:
        The dtype of their penalties.
    """
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


@torch.compiler.assume_constant_result  # inside torch.compile: a constant, not a traced .item()
@memoized(256)
def bound(dtype: torch.dtype, limit: float) -> float:
    """The largest value of ``dtype`` within ``limit``, as the penalties read the limit.

    The penalties compare ``|w|`` with ``limit`` rounded to the accumulation dtype (float32, or
    float64 for float64 weights).  Counting, checking and clamping against this bound agrees
    with them: a weight is in range exactly when its magnitude penalty is zero.

    Args:
        dtype: the weight's dtype.
        limit: the chip's limit (``spec.limit``).

    Returns:
        The bound, as a Python float.

    Example::

        >>> bound(torch.bfloat16, 0.9)   # bfloat16 holds 0.8984375 and 0.90234375 around 0.9
        0.8984375
    """
    held = torch.tensor(limit, dtype=accumulation_dtype(dtype)).item()
    value = torch.tensor(held, dtype=dtype)
    if value.item() > held:
        value = torch.nextafter(value, torch.zeros_like(value))
    return value.item()


class PenaltyTerms(NamedTuple):
    """The two penalty terms, unscaled, each divided by the number of tracked elements.

    Attributes:
        magnitude: the magnitude term, a 0-dim tensor.
        topology: the topology term, a 0-dim tensor.
    """

    magnitude: Tensor
    topology: Tensor


def block_view(m: Tensor, run: tuple[int, int, int]) -> Tensor:
    """Rows ``start .. start + count*length`` of ``m`` (``(rows, columns)``) as
    ``(count, length, columns)``: ``count`` blocks of ``length`` rows.

    Args:
        m: a connectivity matrix, ``(rows, columns)``.
        run: ``(start, count, length)``, one of :meth:`Layout.runs <nwave_param.Layout.runs>`.

    Returns:
        A view of ``m``, ``(count, length, columns)``.
    """
    start, count, length = run
    return m[start : start + count * length].view(count, length, m.shape[-1])


# --------------------------------------------------------------------------------------------
# The penalties
# --------------------------------------------------------------------------------------------


def penalty_sums(weights: Sequence[Tensor], layouts: Sequence[Layout], spec: ChipSpec, power: int) -> tuple[Tensor, Tensor]:
    """``(magnitude sum, topology sum)`` over ``weights``: the formulas, op by op, differentiable.

    Sums are float32 (float64 if any weight is float64).  This is the definition: what
    ``torch.compile`` traces and fuses, and what double backward differentiates; the engine
    (``nwave_param._engine.penalties``) computes the same sums in few kernels, and autograd's
    gradient of this is the gradient it writes out.

    Args:
        weights: the weights, on one device.
        layouts: each weight's :class:`~nwave_param.Layout`.
        spec: the chip: its ``limit`` and ``group_size``.
        power: the magnitude penalty's exponent, 1 or 2.

    Returns:
        ``(magnitude, topology)``: two 0-dim tensors, differentiable in ``weights``.
    """
    dtype = result_dtype(weights)
    magnitude = topology = torch.zeros((), dtype=dtype, device=weights[0].device if weights else None)
    for weight, layout in zip(weights, layouts):
        m = layout.matrix(weight.to(accumulation_dtype(weight.dtype)))
        magnitude = magnitude + torch.relu(m.abs() - spec.limit).pow(power).sum().to(dtype)
        for run in layout.runs(layout.rows(weight.shape), spec.group_size):
            blocks = block_view(m, run)
            topology = topology + torch.minimum(blocks.relu().sum(-2), (-blocks).relu().sum(-2)).sum().to(dtype)
    return magnitude, topology


@torch.no_grad()
def weight_sums(weight: Tensor, layout: Layout, spec: ChipSpec, power: int) -> tuple[Tensor, Tensor]:
    """``(magnitude sum, topology sum)`` of one weight, as :func:`penalty_sums` adds them up.

    Args:
        weight: the weight.
        layout: its :class:`~nwave_param.Layout`.
        spec: the chip: its ``limit`` and ``group_size``.
        power: the magnitude penalty's exponent, 1 or 2.

    Returns:
        ``(magnitude, topology)``: two 0-dim tensors, without gradient.

    Example (the worked example: columns P = 1.7, Q = 0.2 and P = 0.4, Q = 1.0)::

        >>> w = torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]], dtype=torch.float64)
        >>> weight_sums(w, Layout(), ChipSpec(limit=0.9), power=2)
        (tensor(0.1000, dtype=torch.float64), tensor(0.6000, dtype=torch.float64))
    """
    return penalty_sums([weight], [layout], spec, power)


@torch.no_grad()
def grouping(m: Tensor, group_size: int) -> Tensor:
    r"""An order of ``m``'s rows whose blocks hold less minority-sign mass: the topology sum
    (:func:`weight_sums`) of ``m[order]`` is at most ``m``'s, and no swap of two rows between two
    blocks lowers it (a local optimum).

    A block column costs :math:`\min(P_{bj}, Q_{bj})`, the L1 mass the chip's sign sharing
    removes.  Rows move between two blocks by the one swap that lowers the pair's cost most,
    pair after pair, until a pass over every pair swaps nothing.  The order of a population's
    neurons is free (the network computes the same with its weights permuted alike), so an order
    that puts neurons of like incoming signs together costs the chip less
    (:func:`nwave_param.regroup_` applies it to a network).

    Args:
        m: the rows' incoming weights, ``(rows, columns)`` (a population's weights side by side).
        group_size: the rows of a block (``spec.group_size``); the last block may be shorter.

    Returns:
        A permutation of ``range(rows)``, int64, on ``m``'s device: row ``i`` of the new order is
        row ``order[i]`` of ``m``.

    Raises:
        TypeError: ``m`` is not a tensor, ``group_size`` not an int.
        ValueError: ``m`` is not 2-D or holds NaN or inf; ``group_size`` is below 1.

    A pass evaluates every pair of blocks, about ``(rows / group_size)**2 / 2`` small tensor ops: a
    fraction of a second for a core's 100 neurons, once per training.

    Example (blocks {0, 1} and {2, 3} each hold both signs; swapping rows 0 and 3 aligns them)::

        >>> grouping(torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), 2)
        tensor([3, 1, 2, 0])
    """
    if not isinstance(m, Tensor):
        raise TypeError(f"grouping: m must be a tensor (rows, columns), got {type(m).__name__}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"grouping: group_size must be an int (spec.group_size), got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"grouping: group_size must be positive, got {group_size}")
    if m.dim() != 2:
        raise ValueError(f"grouping: m must be (rows, columns), got shape {tuple(m.shape)}")
    if not bool(m.isfinite().all()):  # once, off the hot path
        raise ValueError("grouping: m holds NaN or inf; no order of its rows means anything")
    work = m.detach().to("cpu", torch.float64)  # once per call, off the hot path: exact sums, plain Python control
    positive, negative = work.clamp(min=0), (-work).clamp(min=0)
    order = torch.arange(m.shape[0])
    blocks = [slice(start, min(start + group_size, m.shape[0])) for start in range(0, m.shape[0], group_size)]

    def cost(p: Tensor, q: Tensor) -> Tensor:
        return torch.minimum(p, q).sum(-1)

    swapped = True
    while swapped:
        swapped = False
        for a, first in enumerate(blocks):
            for second in blocks[a + 1 :]:
                rows_a, rows_b = order[first], order[second]
                pa, qa, pb, qb = positive[rows_a], negative[rows_a], positive[rows_b], negative[rows_b]
                p_a, q_a, p_b, q_b = pa.sum(0), qa.sum(0), pb.sum(0), qb.sum(0)
                before = (cost(p_a, q_a) + cost(p_b, q_b)).item()
                dp, dq = pb[None] - pa[:, None], qb[None] - qa[:, None]  # (rows of a, rows of b, columns): a's gain
                after = cost(p_a + dp, q_a + dq) + cost(p_b - dp, q_b - dq)
                best = int(after.argmin())
                # a swap must lower the cost by more than rounding, so that the passes end
                if after.flatten()[best].item() < before - 1e-9 * (1.0 + before):
                    i, j = divmod(best, len(rows_b))
                    order[first.start + i], order[second.start + j] = rows_b[j].clone(), rows_a[i].clone()
                    swapped = True
    return order.to(m.device)


# --------------------------------------------------------------------------------------------
# What the chip holds
# --------------------------------------------------------------------------------------------


def mixed_blocks(weight: Tensor, layout: Layout, spec: ChipSpec) -> Tensor:
    """Boolean ``(blocks, columns)``: the block column holds a strictly positive and a strictly
    negative entry.

    Args:
        weight: the weight.
        layout: its :class:`~nwave_param.Layout`.
        spec: the chip: its ``group_size``.

    Returns:
        A boolean tensor, ``(blocks, columns)``, on the weight's device.
    """
    m = layout.matrix(weight)
    mixed = [
        ((blocks > 0).any(-2) & (blocks < 0).any(-2))
        for blocks in (block_view(m, run) for run in layout.runs(layout.rows(weight.shape), spec.group_size))
    ]
    return torch.cat(mixed) if mixed else torch.zeros(0, m.shape[-1], dtype=torch.bool, device=weight.device)


@memoized(64)
@torch.inference_mode(False)
def levels(spec: ChipSpec, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The grid's ``2 * spec.levels + 1`` values as ``dtype`` holds them, ascending.

    Level ``k`` is ``k * step`` (``step = limit / levels``) rounded to ``dtype``, and no level lies
    beyond :func:`bound`, the largest value of ``dtype`` within the limit: the top level is the
    bound, and in a low precision a level next to it that rounds past it is held as the bound too,
    so that a projected weight is always in range.

    Args:
        spec: the chip, with ``bits`` set.
        dtype: the dtype the levels are held in.
        device: the device of the result.

    Returns:
        The levels, a 1-D tensor of ``dtype`` on ``device``.
    """
    top = bound(dtype, spec.limit)
    step = spec.limit / spec.levels
    values = (torch.arange(-spec.levels, spec.levels + 1, dtype=torch.float64) * step).to(dtype).clamp_(-top, top)
    values[0], values[-1] = -top, top
    return values.to(device)


@memoized(64)
@torch.inference_mode(False)
def grid(spec: ChipSpec, dtype: torch.dtype, compute: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(levels, boundaries)``, in ``compute``: what :func:`round_to_grid` looks ``dtype`` values up in.

    ``levels`` are the distinct values of :func:`levels`, ascending, then NaN; ``boundaries``
    separate them so that ``torch.bucketize(x, boundaries)`` is the index of the level nearest to
    ``x``: each is the largest ``compute`` value at or below the exact midpoint between two
    neighbouring levels, one value lower where a tie goes to the upper level (the even ``k``); the
    last is ``+inf``, so that NaN finds NaN.  Ties happen only between levels at least two ulps
    apart, which are the roundings of single ``k``.

    Args:
        spec: the chip, with ``bits`` set.
        dtype: the dtype the levels are held in.
        compute: the dtype of the values looked up.
        device: the device of the result.

    Returns:
        ``(levels, boundaries)``: two 1-D tensors of ``compute`` on ``device``.
    """
    held = levels(spec, dtype, torch.device("cpu")).double()
    last = torch.ones_like(held, dtype=torch.bool)
    last[:-1] = held[1:] != held[:-1]
    values, ks = held[last], torch.arange(-spec.levels, spec.levels + 1)[last]  # k: the last level holding each value
    # the exact midpoint of two neighbours, as s + error (halving is exact; TwoSum gives the sum's rounding error)
    a, b = values[:-1] / 2, values[1:] / 2
    s = a + b
    error = (a - (s - (s - a))) + (b - (s - a))
    bounds = s.to(compute)
    down = torch.tensor(-math.inf, dtype=compute)
    bounds = torch.where(bounds.double() - s > error, torch.nextafter(bounds, down), bounds)  # now at or below it
    tie_goes_up = (bounds.double() - s == error) & (ks[:-1] % 2 == 1)  # of two equally near levels, the even k
    bounds = torch.where(tie_goes_up, torch.nextafter(bounds, down), bounds)
    table = torch.cat([values.to(compute), torch.tensor([math.nan], dtype=compute)])
    return table.to(device), torch.cat([bounds, torch.tensor([math.inf], dtype=compute)]).to(device)


def round_to_grid(x: Tensor, spec: ChipSpec, dtype: torch.dtype | None = None) -> Tensor:
    """The level nearest to each entry of ``x`` (already in range), the levels as ``dtype``
    (default ``x.dtype``) holds them; of two equally near levels, the one with the even ``k``, as
    ``torch.round`` rounds halves.  A zero carries the sign of ``x`` (as ``torch.round(-0.3)`` is
    ``-0.0``), so a level keeps its own bits; NaN stays NaN.

    Args:
        x: the values, already in range.
        spec: the chip, with ``bits`` set.
        dtype: the dtype the levels are held in; None: ``x.dtype``.

    Returns:
        A new tensor like ``x``: each entry's nearest level.
    """
    levels, boundaries = grid(spec, dtype or x.dtype, x.dtype, x.device)
    x = x.contiguous()  # bucketize copies (and warns about) a strided input
    return torch.copysign(levels[torch.bucketize(x, boundaries)], x)


def off_grid(weight: Tensor, spec: ChipSpec) -> Tensor:
    """Boolean, like ``weight``: the entry is not a grid level (all False without ``spec.bits``).

    Compared exactly, in the weight's dtype: an entry is on the grid when rounding it to the
    grid returns it bit for bit.

    Args:
        weight: the weight.
        spec: the chip: its ``limit`` and ``bits``.

    Returns:
        A boolean tensor of the weight's shape.
    """
    if spec.bits is None:
        return torch.zeros_like(weight, dtype=torch.bool)
    top = bound(weight.dtype, spec.limit)
    return round_to_grid(weight.clamp(-top, top), spec) != weight


@torch.no_grad()
def project(weight: Tensor, layout: Layout, spec: ChipSpec) -> Tensor:
    r"""What the chip holds for ``weight``: the L1-nearest mappable point, as a new tensor.

    Each block column keeps one sign.  Keeping sign ``s`` costs, over its entries of sign ``s``,
    the distance to what the chip can hold of them (``clamp`` into the range, then, with
    ``spec.bits``, the nearest grid level), plus the L1 mass of the other sign's entries, which
    become 0.  The cheaper sign is kept (a tie keeps the positive side).  Without ``bits`` the
    comparison is exactly: keep the positive side when :math:`P \ge Q` after clamping.
    Entries already feasible (``-0.0`` included) are kept bit for bit, so ``project`` is idempotent.

    Args:
        weight: the weight.
        layout: its :class:`~nwave_param.Layout`.
        spec: the chip: its ``limit``, ``group_size`` and ``bits``.

    Returns:
        A new tensor of the weight's shape and dtype, without gradient.

    Example (the worked example: column 0 keeps its positives, column 1 its negatives)::

        >>> project(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]), Layout(), ChipSpec(limit=0.9))
        tensor([[ 0.5000, -0.9000],
                [ 0.0000,  0.0000],
                [ 0.9000,  0.0000]])
    """
    top = bound(weight.dtype, spec.limit)
    held = weight.clamp(-top, top)
    acc = accumulation_dtype(weight.dtype)
    if spec.bits is None:
        gain = held.to(acc).abs()  # what keeping an entry's sign preserves of |w|: P and Q after clamping
    else:
        held = round_to_grid(held, spec)
        kept, magnitude = held.to(acc).abs(), weight.to(acc).abs()
        gain = kept - 2 * (kept - magnitude).clamp(min=0)  # |w| - |w - q(w)|
    m, gains = layout.matrix(held).contiguous(), layout.matrix(gain)
    for run in layout.runs(layout.rows(weight.shape), spec.group_size):
        blocks, block_gains = block_view(m, run), block_view(gains, run)
        keep_positive = (
            torch.where(blocks > 0, block_gains, 0).sum(-2) >= torch.where(blocks < 0, block_gains, 0).sum(-2)
        ).unsqueeze(-2)
        blocks.masked_fill_(torch.where(keep_positive, blocks < 0, blocks > 0), 0)
    return layout.unmatrix(m, weight.shape)


def unprojectable(names: Sequence[str], weights: Sequence[Tensor]) -> list[str]:
    """Why :func:`project` cannot give each weight a value the chip holds, one line a weight:
    NaN or infinite values have no nearest mappable value (clamping would guess one).

    Args:
        names: the weights' names, for the lines.
        weights: the weights.

    Returns:
        One line for each weight holding NaN or infinite values; empty when every one projects.
    """
    named = [(name, w) for name, w in zip(names, weights) if w.numel()]
    if not named:
        return []
    # the least and the largest entry: NaN if any entry is, infinite if one is; one fast reduction a
    # weight (isfinite().all() runs a boolean kernel, twenty times slower on the CPU)
    ends = torch.stack([torch.stack(torch.aminmax(w)).double() for _, w in named]).isfinite().all(1).tolist()
    return [f"{name} holds NaN or infinite values" for (name, _), finite in zip(named, ends) if not finite]


# --------------------------------------------------------------------------------------------
# Hardening: computing with what the chip holds, training the latent weight
# --------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Returns ``value``; passes the gradient to ``weight`` unchanged."""

    @staticmethod
    def forward(weight: Tensor, value: Tensor) -> Tensor:
        return value

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def harden(weight: Tensor, layout: Layout, spec: ChipSpec, hardness: float, noise: Tensor | None = None) -> Tensor:
    r""":math:`w + h\,(\mathrm{chip}(w) - w)`, plus ``h * noise``, with a straight-through gradient.

    At ``h = 1`` the value is ``project(w) + noise`` exactly, bit for bit; at ``h = 0`` (no noise)
    it is ``weight`` itself.  The gradient that reaches ``weight`` is the incoming one, unchanged.

    Args:
        weight: the latent weight.
        layout: its :class:`~nwave_param.Layout`.
        spec: the chip: its ``limit``, ``group_size`` and ``bits``.
        hardness: ``h``, from 0 (the weight itself) to 1 (what the chip holds).
        noise: added to the chip's value, as mismatch (scaled by ``h``); None: none.

    Returns:
        The value to compute with, of the weight's shape; its gradient flows to ``weight``.
    """
    if hardness == 0 and noise is None:
        return weight
    with torch.no_grad():
        target = project(weight, layout, spec)
        value = target if hardness == 1 else weight + hardness * (target - weight)
        if noise is not None:
            value = value + (noise if hardness == 1 else hardness * noise)
    return _StraightThrough.apply(weight, value)


def __getattr__(name: str) -> object:
    """0.3's ``Penalties``, deprecated for one release: it is :class:`PenaltyTerms`."""
    if name == "Penalties":
        import warnings

        warnings.warn(
            "nwave_param.functional.Penalties is deprecated: it is PenaltyTerms (the old name goes in 0.5)",
            DeprecationWarning,
            stacklevel=2,
        )
        return PenaltyTerms
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
