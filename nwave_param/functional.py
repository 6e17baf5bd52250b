r"""The chip-constraint math, as pure functions on tensors.

For one weight read as its connectivity matrix ``M`` (see :class:`~nwave_param.layout.Layout`):

* magnitude :math:`= \sum_w \mathrm{relu}(|w| - \text{limit})^{p}`, :math:`p \in \{1, 2\}`;
* topology :math:`= \sum_{b, j} \min(P_{bj}, Q_{bj})` with
  :math:`P_{bj} = \sum_{i \in b} \mathrm{relu}(M_{ij})` and
  :math:`Q_{bj} = \sum_{i \in b} \mathrm{relu}(-M_{ij})` over the rows ``i`` of block ``b``:
  the L1 distance from block column ``(b, j)`` to the nearest sign-aligned one.

Sums are taken in float32 (float64 for float64 weights), so half-precision weights accumulate
without overflow.  The penalties of :mod:`nwave_param.registry` divide these sums by the number
of tracked elements.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .layout import Layout

__all__ = [
    "Penalties",
    "accumulation_dtype",
    "block_sums",
    "block_view",
    "limit_in",
    "magnitude_sum",
    "mixed_blocks",
    "penalties",
    "penalty",
    "project",
    "reference_engine",
    "result_dtype",
    "topology_sum",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_dtype(weights: Sequence[Tensor]) -> torch.dtype:
    """The penalties' dtype: float64 if any weight is float64, else float32."""
    return torch.float64 if any(w.dtype == torch.float64 for w in weights) else torch.float32


def _accumulate(weight: Tensor) -> Tensor:
    return weight.to(accumulation_dtype(weight.dtype))


def block_view(m: Tensor, run: tuple[int, int, int]) -> Tensor:
    """Rows ``start .. start + count*length`` of ``m`` (``(..., rows, columns)``) as
    ``(..., count, length, columns)``: ``count`` blocks of ``length`` rows."""
    start, count, length = run
    return m[..., start : start + count * length, :].reshape(*m.shape[:-2], count, length, m.shape[-1])


def magnitude_sum(weight: Tensor, limit: float, power: int = 2) -> Tensor:
    r""":math:`\sum \mathrm{relu}(|w| - \text{limit})^{p}` over every element of ``weight``.

    Example::

        >>> magnitude_sum(torch.tensor([[0.5, -1.0], [1.2, 0.9]]), limit=0.9)
        tensor(0.1000)
    """
    excess = (_accumulate(weight).abs() - limit).relu()
    return (excess.square() if power == 2 else excess).sum()


def block_sums(weight: Tensor, layout: Layout, group_size: int) -> tuple[Tensor, Tensor]:
    """``(P, Q)``: positive and negative L1 mass of every block column, each ``(blocks, columns)``.

    Blocks are listed run by run; a weight with no rows gives ``(0, columns)`` tensors.
    """
    m = layout.matrix(_accumulate(weight))
    positive, negative = [], []
    for run in layout.runs(m.shape[0], group_size):
        blocks = block_view(m, run)
        positive.append(blocks.relu().sum(1))
        negative.append((-blocks).relu().sum(1))
    if not positive:
        empty = m.new_zeros(0, m.shape[1])
        return empty, empty
    return torch.cat(positive), torch.cat(negative)


def topology_sum(weight: Tensor, layout: Layout, group_size: int) -> Tensor:
    r""":math:`\sum_{b,j} \min(P_{bj}, Q_{bj})`: the L1 mass to remove to make every block
    column of ``weight`` sign-aligned.

    Example (one block holding 3 neurons, 2 inputs)::

        >>> topology_sum(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]), Layout(), 5)
        tensor(0.6000)
    """
    positive, negative = block_sums(weight, layout, group_size)
    return torch.minimum(positive, negative).sum()


class Penalties(NamedTuple):
    """The two penalty terms, unscaled, each divided by the number of tracked elements."""

    magnitude: Tensor
    topology: Tensor


Runs = tuple[tuple[int, int, int], ...]


def penalty_sums(
    weights: Sequence[Tensor], layouts: Sequence[Layout], runs: Sequence[Runs], limit: float, power: int
) -> tuple[Tensor, Tensor]:
    """Magnitude and topology sums over all ``weights`` (``runs[k] = layouts[k].runs(...)``).

    Both terms reduce over the same block views, so a compiler fuses them into one pass over
    each weight; the graph is the direct formula, so autograd's subgradients are the formula's.
    """
    magnitudes, topologies = [], []
    for weight, layout, weight_runs in zip(weights, layouts, runs):
        m = layout.matrix(_accumulate(weight))
        for run in weight_runs:
            blocks = block_view(m, run)
            excess = (blocks.abs() - limit).relu()
            magnitudes.append((excess.square() if power == 2 else excess).sum(1).sum())
            topologies.append(torch.minimum(blocks.relu().sum(1), (-blocks).relu().sum(1)).sum())
    dtype = result_dtype(weights)
    if not magnitudes:
        zero = torch.zeros((), dtype=dtype, device=weights[0].device if weights else None)
        return zero, zero.clone()
    return (
        torch.stack([x.to(dtype) for x in magnitudes]).sum(),
        torch.stack([x.to(dtype) for x in topologies]).sum(),
    )


def reference_engine(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    runs: Sequence[Runs],
    limit: float,
    power: int,
    count: int,
    scales: tuple[float, float] | None = None,
    sums=penalty_sums,
) -> Penalties | Tensor:
    """The penalties from ``sums`` (:func:`penalty_sums`), divided by ``count``; with
    ``scales = (alpha, lam)`` the one tensor ``alpha * magnitude + lam * topology``.

    An *engine*: :mod:`nwave_param.kernels` provides a faster one with the same contract.
    """
    magnitude, topology = sums(weights, layouts, runs, limit, power)
    result = Penalties(magnitude / count, topology / count)
    if scales is None:
        return result
    return scales[0] * result.magnitude + scales[1] * result.topology


def _evaluate(weights, layouts, limit, power, group_size, scales, engine):
    runs = [layout.runs(layout.rows(w.shape), group_size) for w, layout in zip(weights, layouts)]
    count = max(sum(w.numel() for w in weights), 1)
    return engine(weights, layouts, runs, limit, power, count, scales)


def penalties(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    limit: float,
    power: int,
    group_size: int,
    engine=reference_engine,
) -> Penalties:
    """Magnitude and topology sums over ``weights``, each divided by their total element count ``N``.

    The result is float32 (float64 if any weight is float64); with no elements it is zero.
    """
    return _evaluate(weights, layouts, limit, power, group_size, None, engine)


def penalty(
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    limit: float,
    power: int,
    group_size: int,
    alpha: float,
    lam: float,
    engine=reference_engine,
) -> Tensor:
    """``alpha * magnitude + lam * topology`` of :func:`penalties`, as one tensor."""
    return _evaluate(weights, layouts, limit, power, group_size, (alpha, lam), engine)


def limit_in(dtype: torch.dtype, limit: float) -> float:
    """The largest value of ``dtype`` within the limit, as the penalties see the limit.

    The penalties compute ``|w| - limit`` in the accumulation dtype, where ``limit`` rounds to
    the nearest float32 (float64 for float64 weights), as torch does when it compares a tensor
    with a Python number.  Counting, checking and clamping against this bound agrees with them:
    a weight is in range exactly when its magnitude penalty is zero.
    """
    held = torch.tensor(limit, dtype=accumulation_dtype(dtype)).item()
    bound = torch.tensor(held, dtype=dtype)
    if bound.item() > held:
        bound = torch.nextafter(bound, torch.zeros_like(bound))
    return bound.item()


def mixed_blocks(weight: Tensor, layout: Layout, group_size: int) -> Tensor:
    """Boolean ``(blocks, columns)``: the block column holds a strictly positive and a strictly
    negative entry."""
    m = layout.matrix(weight)
    mixed = [
        (blocks > 0).any(1) & (blocks < 0).any(1)
        for blocks in (block_view(m, run) for run in layout.runs(m.shape[0], group_size))
    ]
    return torch.cat(mixed) if mixed else torch.zeros(0, m.shape[1], dtype=torch.bool)


def project(weight: Tensor, layout: Layout, limit: float, group_size: int) -> Tensor:
    """The L1-nearest weight the chip can hold, as a new tensor of the same shape and dtype.

    Clamp every entry into ``[-limit, limit]``; then in each block column zero the entries of
    the sign with the smaller L1 mass (after clamping; a tie keeps the positive side).  For one
    block column, keeping the positive side costs ``Q`` more than clamping does and keeping the
    negative side costs ``P`` more, so zeroing the whole minority side *is* the nearest
    sign-aligned point.  Entries already in range and aligned (``-0.0`` included) are kept bit
    for bit, so projecting twice changes nothing.
    """
    bound = limit_in(weight.dtype, limit)
    m = layout.matrix(weight.clamp(-bound, bound)).contiguous()
    for run in layout.runs(m.shape[0], group_size):
        blocks = block_view(m, run)
        acc = accumulation_dtype(weight.dtype)
        positive = blocks.clamp(min=0).sum(1, dtype=acc)
        negative = blocks.clamp(max=0).sum(1, dtype=acc).neg()
        keep_positive = (positive >= negative).unsqueeze(1)
        minority = torch.where(keep_positive, blocks < 0, blocks > 0)
        blocks.masked_fill_(minority, 0)
    return layout.unmatrix(m, weight.shape)
