"""How each synapse reads its weight: the :class:`~nwave_param.layout.Layout` an op implies (``x @ W`` reads ``W`` as ``[in, out]``)."""

from __future__ import annotations

from collections.abc import Mapping

from nwave_param.core.trace.records import Trace, Use
from nwave_param.core.trace.synapses import RNN_OPS
from nwave_param.errors import one_line
from nwave_param.layout import Layout

__all__ = ["layouts_read"]


def _layout_of_use(use: Use, dims: int) -> Layout | None:
    """The layout a synapse reads its weight (of ``dims`` dims) with; None when its output
    neurons do not run along one dim of the Parameter, the way a layout can say."""
    reading = (use.outputs, use.inputs)
    if use.op == "conv":
        return Layout(groups=use.groups) if reading == (0, 1) else None
    if use.op == "conv_transpose":
        return Layout(groups=use.groups, transposed=True) if reading == (1, 0) else None
    if use.op in RNN_OPS:
        return Layout(gates=use.gates) if use.outputs == 0 else None
    if use.outputs is None or use.inputs is None:
        return None
    if dims == 2 and reading == (1, 0):
        return Layout(inputs_first=True)
    return Layout() if use.outputs == 0 else None


def layouts_read(traced: Trace, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Layout | None, Use]]:
    """Each weight the forward used as a synapse (of 2 or more dims, by ``shapes``), with the layout
    its uses read it with and one of those uses; None where no use says which dim indexes the
    output neurons.  A gain (an elementwise product) is no matrix: a weight used only so is left
    out.  A use that reads only some of a weight's output neurons (the forward splits it) is said
    in a warning: nwave_param cuts the weight's blocks from its first row.

    Raises:
        ValueError: a weight read in two ways (``x @ W`` and ``F.linear(x, W)``), naming both uses.
    """
    import warnings

    found: dict[str, tuple[Layout | None, Use]] = {}
    for name, uses in traced.uses.items():
        shape = shapes.get(name)
        if shape is None or len(shape) < 2:
            continue
        readings: dict[Layout | None, Use] = {}
        for use in uses:
            if use.op != "gain":
                readings.setdefault(_layout_of_use(use, len(shape)), use)
        known = {layout: use for layout, use in readings.items() if layout is not None}
        if len(known) > 1:
            (_, use_a), (_, use_b) = list(known.items())[:2]
            raise ValueError(
                f"{one_line(name)} is read two ways: {one_line(use_a.describe())} and {one_line(use_b.describe())}; one weight is one "
                "matrix on the chip: use it one way, or give each use a weight of its own"
            )
        if not readings:
            continue
        found[name] = next(iter(known.items())) if known else (None, next(iter(readings.values())))
        layout, use = found[name]
        rows = layout.rows(shape) if layout is not None else None
        partial = [
            u
            for u in uses
            if u.op != "gain"
            and rows is not None
            and u.rows is not None
            and u.rows < rows // max(1, layout.groups if layout.transposed else 1)
        ]
        if partial and layout is not None and not layout.gates > 1:
            warnings.warn(
                f"{one_line(name)}: the forward uses {partial[0].rows} of its {rows} output rows in {one_line(partial[0].where)}: "
                "nwave_param cuts its blocks of output neurons from its first row, so a part that starts elsewhere may share a "
                "block with another; give each part a weight of its own",
                stacklevel=4,
            )
    return found
