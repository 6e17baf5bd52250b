"""A weight's Layout read only as its tensor can be: a described layout is taken when it can be the
tensor's, checked in full before any math, and refused by name when it cannot be or when it
contradicts the model's own reading."""

import contextlib
import io
import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import nwave_param as nwp
from nwave_param.checkpoints.cli import main
from nwave_param.layout import Layout


def _described(value, layout, hardness=0.0):
    """A state_dict holding ``value`` as fc.weight, registered, with ``layout`` in its description."""
    from nwave_param.description import encode

    return {"fc.parametrizations.weight.original": value, "fc.parametrizations.weight.0._extra_state": encode(layout, nwp.H1V1, hardness)}


def _fits(shape, layout):
    """Whether a weight of ``shape`` can be read with ``layout``, written out: 2+ dims; a
    convolution's reading (groups, transposed) only of 3+ dims; the gates split the output rows
    (dim 1 times the groups, transposed), the groups split dim 0."""
    rows = shape[1] * layout.groups if layout.transposed and len(shape) >= 2 else shape[0]
    convolution = layout.groups > 1 or layout.transposed
    return len(shape) >= 2 and (len(shape) >= 3 or not convolution) and rows % layout.gates == 0 and shape[0] % layout.groups == 0


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    layout=st.builds(Layout, gates=st.integers(1, 4), groups=st.integers(1, 3), transposed=st.booleans()),
)
def test_property_a_described_layout_is_read_exactly_when_it_can_be_this_tensors(shape, layout):
    """Without a model the description is the file's claim, taken as it is, when it can be this
    tensor's layout; otherwise refused, naming the weight, its shape and the layout."""
    state = _described(torch.randn(shape), layout)
    if _fits(shape, layout):
        (row,) = nwp.check_state_dict(state)
        assert row.layout == layout and not row.assumed
    else:
        with pytest.raises(
            nwp.CheckpointError, match=rf"^state_dict: fc.weight(:| of shape {re.escape(str(tuple(shape)))} cannot be read with)"
        ):
            nwp.check_state_dict(state)


def test_a_description_that_contradicts_the_models_reading_is_refused_by_name():
    """A 2-D weight described as an LSTM's (4 gates) is read so without a model (the file's
    claim); the model's own reading refuses it, before any computation with the file's layout,
    and so is a layout that cannot be the tensor's (a RuntimeError from reshaping, before)."""
    value = torch.randn(8, 6)
    assert nwp.check_state_dict(_described(value, Layout(gates=4)))[0].layout == Layout(gates=4)
    model = nn.Module()
    model.fc = nn.Linear(6, 8)
    for layout in (Layout(gates=4), Layout(gates=2, transposed=True), Layout(groups=3, transposed=True)):
        for call in (nwp.check_state_dict, nwp.project_state_dict):
            with pytest.raises(
                nwp.CheckpointError,
                match=(
                    r"^fc.weight: the model reads it with Layout\(gates=1, groups=1, transposed=False\), "
                    rf"but state_dict describes {re.escape(str(layout))}"
                ),
            ):
                call(_described(value, layout, hardness=0.5), model=model)


@settings(max_examples=150)
@example(shape=[4, 1], gates=2, groups=1, transposed=True)  # the issue's: 4 input channels, 1 output row, 2 gates
@given(
    shape=st.lists(st.integers(0, 6), min_size=2, max_size=3),
    gates=st.integers(1, 4),
    groups=st.integers(1, 3),
    transposed=st.booleans(),
)
def test_property_a_described_layout_is_checked_in_full_before_any_math(tmp_path_factory, shape, gates, groups, transposed):
    from nwave_param.description import encode

    layout = Layout(gates, groups, transposed)
    path = tmp_path_factory.mktemp("layout") / "described.pt"
    torch.save({"fc.parametrizations.weight.original": torch.randn(shape) * 3,
                "fc.parametrizations.weight.0._extra_state": encode(layout, nwp.H1V1, 0.0)}, path)
    for argv in (["check", path], ["project", path, "-o", path.with_name("out.pt")]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main([str(a) for a in argv])
        assert code in (0, 1) or ("fc.weight of shape" in err.getvalue() and "cannot be read with" in err.getvalue()), err.getvalue()
