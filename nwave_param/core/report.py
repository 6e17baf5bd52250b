"""What stands between a model and the chip, weight by weight."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from nwave_param import functional
from nwave_param.errors import one_line
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["WeightReport", "Report", "build_report", "layout_fields"]


@dataclass(frozen=True)
class WeightReport:
    """One tracked weight.

    ``block_columns`` counts the block columns of its dense-equivalent connectivity matrix
    (a block of ``group_size`` output neurons times one input) and ``mixed_block_columns`` those
    holding both a strictly positive and a strictly negative entry.  ``off_grid`` counts entries
    that are not grid levels (0 without ``spec.bits``).  ``magnitude`` and ``topology`` are its
    contributions to the registry's penalties (already divided by the total element count ``N``),
    so the rows sum to ``reg.penalty_terms()``.  ``layout`` is how it was read, ``assumed`` whether
    that layout is guessed from a checkpoint's names and shapes (see :mod:`nwave_param.checkpoints.offline`).

    Args:
        name: the weight's dotted name.
        shape: its shape.
        numel: its number of elements.
        max_abs: its largest magnitude.
        out_of_range: how many of its entries lie outside ``[-limit, limit]``.
        nonfinite: how many of its entries are NaN or infinite.
        block_columns: the block columns of its connectivity matrix.
        mixed_block_columns: how many of those hold both signs.
        off_grid: how many of its entries are not grid levels.
        magnitude: its share of the magnitude penalty.
        topology: its share of the topology penalty.
        layout: how it was read as a connectivity matrix.
        assumed: whether ``layout`` is guessed.
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    max_abs: float
    out_of_range: int
    nonfinite: int
    block_columns: int
    mixed_block_columns: int
    off_grid: int
    magnitude: float
    topology: float
    layout: Layout = Layout()
    assumed: bool = False

    @property
    def is_mappable(self) -> bool:
        """Finite, within ``[-limit, limit]``, with no mixed block column and on the grid."""
        return self.nonfinite == 0 and self.out_of_range == 0 and self.mixed_block_columns == 0 and self.off_grid == 0


def _fields(row: WeightReport) -> dict:
    """The row's fields by name, as they are (``dataclasses.asdict`` deep-copies each value: seconds for 100,000 rows)."""
    return {name: getattr(row, name) for name in _FIELD_NAMES}


_FIELD_NAMES = tuple(field.name for field in fields(WeightReport))
_SUMMED = ("numel", "out_of_range", "nonfinite", "block_columns", "mixed_block_columns", "off_grid", "magnitude", "topology")


def aligned(lines: Sequence[Sequence[str]], align: str | None = None) -> list[str]:
    """Rows of cells as text columns, each left- or right-aligned as ``align`` says (``"l"`` or
    ``"r"`` per column; by default the first two, names, left and the others, numbers, right)."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    align = align or "ll" + "r" * (len(widths) - 2)
    return ["  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(line, widths, align)).rstrip() for line in lines]


def layout_fields(layout: Layout, assumed: bool) -> dict:
    """How a weight was read, as JSON: ``"layout"`` ``"exact"`` or ``"assumed"`` (guessed from a
    checkpoint's names and shapes), and the layout's fields."""
    return {"layout": "assumed" if assumed else "exact", **layout.to_dict()}


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Report:
    """Per-weight rows, totals and the verdict; a sequence of its rows.

    ``str(report)`` is an aligned table with a totals line; ``report.to_dict()`` is JSON-ready
    (non-finite floats become ``None``: the ``nonfinite`` counts say why).

    Args:
        rows: one :class:`WeightReport` per weight.
        spec: the chip the weights are held to.
        power: the magnitude penalty's exponent.
    """

    def __init__(self, rows: Sequence[WeightReport], spec: ChipSpec, power: int) -> None:
        self.rows = list(rows)
        self.spec = spec
        self.power = power

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index: int) -> WeightReport:
        return self.rows[index]

    @property
    def is_mappable(self) -> bool:
        """Every weight finite, within ``[-limit, limit]``, with no mixed block column and on the grid."""
        return all(row.is_mappable for row in self.rows)

    @property
    def totals(self) -> dict[str, float | int]:
        """The counts and penalties summed over the rows, and the largest ``max_abs`` (0.0 for none)."""
        totals = {key: sum(getattr(row, key) for row in self.rows) for key in _SUMMED}
        totals["max_abs"] = max((row.max_abs for row in self.rows), default=0.0)
        return totals

    def spec_data(self) -> dict:
        """The spec the report holds the weights to, and the penalty's power, JSON-ready.

        Returns:
            The spec's fields (:meth:`ChipSpec.to_dict <nwave_param.ChipSpec.to_dict>`) and ``"power"``.
        """
        return {**self.spec.to_dict(), "power": self.power}

    def to_dict(self) -> dict:
        """The report as JSON-ready data; non-finite floats become ``None``.

        Returns:
            ``{"mappable": ..., "spec": ..., "rows": [...], "totals": {...}}``: the verdict,
            :meth:`spec_data`, one dict per row (its fields, ``shape`` as a list, and how it was
            read: :func:`layout_fields`) and :attr:`totals`.
        """
        rows = []
        for row in self.rows:
            entry = _fields(row)
            entry["shape"] = list(row.shape)
            del entry["assumed"]
            entry.update(layout_fields(row.layout, row.assumed))
            for key in ("max_abs", "magnitude", "topology"):
                entry[key] = _json_float(entry[key])
            rows.append(entry)
        totals = {k: (_json_float(v) if isinstance(v, float) else v) for k, v in self.totals.items()}
        return {
            "mappable": self.is_mappable,
            "spec": self.spec_data(),
            "rows": rows,
            "totals": totals,
        }

    def _columns(self) -> list[str]:
        columns = ["name", "shape", "numel", "max_abs", "out_of_range", "nonfinite", "block_columns", "mixed_block_columns"]
        return columns + (["off_grid"] if self.spec.bits is not None else []) + ["magnitude", "topology"]

    def __str__(self) -> str:
        columns = self._columns()

        def cells(values: dict) -> list[str]:
            return [f"{values[key]:.4g}" if isinstance(values[key], float) else str(values[key]) for key in columns]

        body = [cells({**_fields(row), "name": _shown(row), "shape": "x".join(map(str, row.shape))}) for row in self.rows]
        total = cells({**self.totals, "name": "total", "shape": ""})
        head, *lines, last = aligned([columns, *body, total])
        rule = "-" * len(head)
        verdict = "mappable" if self.is_mappable else "NOT mappable"
        grid = f", {self.spec.bits}-bit grid" if self.spec.bits is not None else ""
        header = f"limit {self.spec.limit}, blocks of {self.spec.group_size}{grid}: {verdict}"
        return "\n".join([header, head, rule, *lines, rule, last])

    def __repr__(self) -> str:
        return f"Report({len(self.rows)} weights, mappable={self.is_mappable})"


def _shown(row: WeightReport) -> str:
    """A row's name as the table shows it: on one line, marked where its layout is guessed."""
    return one_line(row.name) + (" (assumed)" if row.assumed else "")


# Weights of one shape, dtype and layout up to this size are measured together, this many
# elements at a time: the rows of many tiny weights cost a few kernels, not a dozen each.  Their
# sums stay below one thread's share of a reduction, so each is summed as it would be alone.
_TOGETHER = 4096
_BATCH = 2**20


def _measures(weight: Tensor, layout: Layout, spec: ChipSpec, power: int, count: int) -> tuple[Tensor, ...]:
    """One weight's numbers, as 0-dim tensors: the definitions of :mod:`nwave_param.functional`,
    written for one weight and run over many at once by ``torch.vmap``."""
    magnitudes = weight.abs()
    magnitude, topology = functional.weight_sums(weight, layout, spec, power)
    return (
        magnitudes.max() if weight.numel() else torch.zeros((), dtype=weight.dtype, device=weight.device),
        (magnitudes > functional.bound(weight.dtype, spec.limit)).sum(),
        (~torch.isfinite(weight)).sum(),
        functional.mixed_blocks(weight, layout, spec).sum(),
        functional.off_grid(weight, spec).sum(),
        magnitude / max(count, 1),
        topology / max(count, 1),
    )


_MEASURED = ("max_abs", "out_of_range", "nonfinite", "mixed_block_columns", "off_grid", "magnitude", "topology")
_CASTS = (float, int, int, int, int, float, float)  # each as WeightReport holds it


@torch.no_grad()
def _rows(
    names: Sequence[str],
    weights: Sequence[Tensor],
    layout: Layout,
    spec: ChipSpec,
    power: int,
    count: int,
    assumed: Collection[str],
) -> list[WeightReport]:
    """The rows of weights of one shape, dtype and layout: one alone, several stacked into one batch."""
    if len(weights) == 1:
        measured = [[value.item()] for value in _measures(weights[0], layout, spec, power, count)]
    else:
        batch = torch.stack([w.detach() for w in weights])
        measured = [value.tolist() for value in torch.vmap(lambda w: _measures(w, layout, spec, power, count))(batch)]
    shape = tuple(weights[0].shape)
    rows = layout.rows(shape)
    blocks_per_population = -(-(rows // layout.gates) // spec.group_size)
    numel = math.prod(shape)
    block_columns = layout.gates * blocks_per_population * (numel // max(rows, 1)) * layout.groups
    return [
        WeightReport(name, shape, numel, block_columns=block_columns, layout=layout, assumed=name in assumed,
                    **{key: cast(values[i]) for key, cast, values in zip(_MEASURED, _CASTS, measured)})
        for i, name in enumerate(names)
    ]


def build_report(
    names: Sequence[str],
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    spec: ChipSpec,
    power: int,
    assumed: Collection[str] = (),
) -> Report:
    """The :class:`Report` of ``weights`` (``N`` is their total element count); the layouts of
    the names in ``assumed`` are guessed.

    Small weights of one shape, dtype and layout are measured together, so that many tiny
    weights cost time in proportion to their elements; every number is what each weight alone gives."""
    count = sum(w.numel() for w in weights)
    batches: dict[tuple, list[list[int]]] = {}  # what is measured together -> the weights' positions, batch by batch
    for i, (weight, layout) in enumerate(zip(weights, layouts)):
        alone = weight.numel() > _TOGETHER or weight.layout != torch.strided
        key = (i,) if alone else (tuple(weight.shape), weight.dtype, weight.device, layout)
        members = batches.setdefault(key, [[]])
        if members[-1] and (len(members[-1]) + 1) * weight.numel() > _BATCH:  # a weight larger than a batch is one alone
            members.append([])
        members[-1].append(i)
    rows: list[WeightReport | None] = [None] * len(weights)
    for members in batches.values():
        for batch in members:
            measured = _rows([names[i] for i in batch], [weights[i] for i in batch], layouts[batch[0]], spec, power, count, assumed)
            for i, row in zip(batch, measured):
                rows[i] = row
    return Report(rows, spec, power)
