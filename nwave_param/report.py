"""What stands between a model and the chip, weight by weight."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from . import functional
from .errors import one_line
from .layout import Layout
from .spec import ChipSpec

__all__ = ["LayerReport", "Report", "build_report", "layout_fields"]


@dataclass(frozen=True)
class LayerReport:
    """One tracked weight.

    ``block_columns`` counts the block columns of its dense-equivalent connectivity matrix
    (a block of ``group_size`` output neurons times one input) and ``mixed_block_columns`` those
    holding both a strictly positive and a strictly negative entry.  ``off_grid`` counts entries
    that are not grid levels (0 without ``spec.bits``).  ``magnitude`` and ``topology`` are its
    contributions to the registry's penalties (already divided by the total element count ``N``),
    so the rows sum to ``reg.penalty_terms()``.  ``layout`` is how it was read, ``assumed`` whether
    that layout is guessed from a checkpoint's names and shapes (see :mod:`nwave_param.offline`).
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
        return self.nonfinite == 0 and self.out_of_range == 0 and self.mixed_block_columns == 0 and self.off_grid == 0


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
    """

    def __init__(self, rows: Sequence[LayerReport], spec: ChipSpec, power: int) -> None:
        self.rows = list(rows)
        self.spec = spec
        self.power = power

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index: int) -> LayerReport:
        return self.rows[index]

    @property
    def is_mappable(self) -> bool:
        """Every weight finite, within ``[-limit, limit]``, with no mixed block column and on the grid."""
        return all(row.is_mappable for row in self.rows)

    @property
    def totals(self) -> dict[str, float | int]:
        totals = {key: sum(getattr(row, key) for row in self.rows) for key in _SUMMED}
        totals["max_abs"] = max((row.max_abs for row in self.rows), default=0.0)
        return totals

    def to_dict(self) -> dict:
        rows = []
        for row in self.rows:
            entry = asdict(row)
            entry["shape"] = list(row.shape)
            del entry["assumed"]
            entry.update(layout_fields(row.layout, row.assumed))
            for key in ("max_abs", "magnitude", "topology"):
                entry[key] = _json_float(entry[key])
            rows.append(entry)
        totals = {k: (_json_float(v) if isinstance(v, float) else v) for k, v in self.totals.items()}
        return {
            "mappable": self.is_mappable,
            "spec": {**self.spec.to_dict(), "power": self.power},
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

        body = [cells({**asdict(row), "name": _shown(row), "shape": "x".join(map(str, row.shape))}) for row in self.rows]
        total = cells({**self.totals, "name": "total", "shape": ""})
        head, *lines, last = aligned([columns, *body, total])
        rule = "-" * len(head)
        verdict = "mappable" if self.is_mappable else "NOT mappable"
        grid = f", {self.spec.bits}-bit grid" if self.spec.bits is not None else ""
        header = f"limit {self.spec.limit}, blocks of {self.spec.group_size}{grid}: {verdict}"
        return "\n".join([header, head, rule, *lines, rule, last])

    def __repr__(self) -> str:
        return f"Report({len(self.rows)} weights, mappable={self.is_mappable})"


def _shown(row: LayerReport) -> str:
    """A row's name as the table shows it: on one line, marked where its layout is guessed."""
    return one_line(row.name) + (" (assumed)" if row.assumed else "")


@torch.no_grad()
def _row(name: str, weight: Tensor, layout: Layout, spec: ChipSpec, power: int, count: int, assumed: bool) -> LayerReport:
    magnitudes = weight.abs()
    rows = layout.rows(weight.shape)
    blocks_per_population = -(-(rows // layout.gates) // spec.group_size)
    dense_columns = (weight.numel() // max(rows, 1)) * layout.groups
    magnitude, topology = functional.weight_sums(weight, layout, spec, power)
    return LayerReport(
        name=name,
        shape=tuple(weight.shape),
        numel=weight.numel(),
        max_abs=magnitudes.max().item() if weight.numel() else 0.0,
        out_of_range=int((magnitudes > functional.bound(weight.dtype, spec.limit)).sum()),
        nonfinite=int((~torch.isfinite(weight)).sum()),
        block_columns=layout.gates * blocks_per_population * dense_columns,
        mixed_block_columns=int(functional.mixed_blocks(weight, layout, spec).sum()),
        off_grid=int(functional.off_grid(weight, spec).sum()),
        magnitude=(magnitude / max(count, 1)).item(),
        topology=(topology / max(count, 1)).item(),
        layout=layout,
        assumed=assumed,
    )


def build_report(
    names: Sequence[str],
    weights: Sequence[Tensor],
    layouts: Sequence[Layout],
    spec: ChipSpec,
    power: int,
    assumed: Collection[str] = (),
) -> Report:
    """The :class:`Report` of ``weights`` (``N`` is their total element count); the layouts of
    the names in ``assumed`` are guessed."""
    count = sum(w.numel() for w in weights)
    rows = [_row(n, w, lay, spec, power, count, n in assumed) for n, w, lay in zip(names, weights, layouts)]
    return Report(rows, spec, power)
