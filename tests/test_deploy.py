"""Report, is_mappable and project_, against plain formulas on the dense matrices of tests/reference.py."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layers import scaled
from reference import ref_dense_populations
from torch import nn

import nwave_param as nwp
from nwave_param import functional
from nwave_param.core.report import build_report
from nwave_param.functional import unprojectable


def block_columns(module, local, weight, group_size):
    """Every block column of the dense matrices of ``module.<local>`` holding ``weight``, as a 1-d tensor."""
    columns = []
    for population in ref_dense_populations(module, local, weight):
        for start in range(0, population.shape[0], group_size):
            block = population[start : start + group_size]
            columns.extend(block[:, j] for j in range(block.shape[1]))
    return columns


def make_module(kind, a, b, seed, scale):
    torch.manual_seed(seed)
    if kind == "linear":
        module = nn.Linear(a, b)
    elif kind == "lstm_cell":
        module = nn.LSTMCell(a, b)
    elif kind == "grouped_conv":
        module = nn.Conv1d(2 * a, 3 * b, 2, groups=min(a, b) if a % min(a, b) == 0 == b % min(a, b) else 1)
    else:
        module = nn.ConvTranspose1d(2 * a, 2 * b, 3, groups=2)
    module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


modules = st.builds(
    make_module,
    st.sampled_from(["linear", "lstm_cell", "grouped_conv", "transposed_conv"]),
    st.integers(1, 7),
    st.integers(1, 8),
    st.integers(0, 2**16),
    st.floats(0.5, 30.0),
)
specs = st.builds(nwp.ChipSpec, limit=st.floats(0.05, 2.0), group_size=st.integers(1, 7))


@settings(max_examples=60, deadline=None)
@given(modules, specs)
def test_project_reaches_the_nearest_mappable_point(module, spec):
    reg = nwp.register(module, spec)
    before = [w.detach().clone() for w in reg.latent_weights()]
    assert reg.project_() is reg
    after = [w.detach().clone() for w in reg.latent_weights()]

    assert reg.is_mappable() and reg.report().is_mappable
    magnitude, topology = reg.penalty_terms()
    assert magnitude.item() == 0 and topology.item() == 0

    limit = spec.limit
    for local, old, new in zip(reg.names, before, after):
        for w, x in zip(block_columns(module, local, old, spec.group_size), block_columns(module, local, new, spec.group_size)):
            assert x.abs().max() <= limit
            assert not ((x > 0).any() and (x < 0).any())
            positive, negative = w.clamp(0, limit), w.clamp(-limit, 0)
            best = min((positive - w).abs().sum(), (negative - w).abs().sum())
            assert (x - w).abs().sum() <= best + 1e-12  # no sign-aligned point in the box is closer
            kept_positive = w.clamp(0, limit).sum() >= -w.clamp(-limit, 0).sum()
            assert torch.equal(x, positive if kept_positive else negative)

    reg.project_()
    assert all(torch.equal(a, b) for a, b in zip(reg.latent_weights(), after))  # idempotent, bit for bit


@settings(max_examples=60, deadline=None)
@given(modules, specs)
def test_report_counts_and_rows_sum_to_penalties(module, spec):
    reg = nwp.register(module, spec)
    report = reg.report()
    assert [row.name for row in report.rows] == reg.names
    for row, weight in zip(report.rows, reg.latent_weights()):
        weight = weight.detach()
        columns = block_columns(module, row.name, weight, spec.group_size)
        assert row.shape == tuple(weight.shape) and row.numel == weight.numel()
        assert row.max_abs == weight.abs().max().item()
        assert row.out_of_range == int((weight.abs() > spec.limit).sum())
        assert row.nonfinite == 0
        assert row.block_columns == len(columns)
        assert row.mixed_block_columns == sum(bool((c > 0).any() and (c < 0).any()) for c in columns)
        assert row.is_mappable == (row.out_of_range == 0 and row.mixed_block_columns == 0)
    p = reg.penalty_terms()
    assert sum(r.magnitude for r in report.rows) == pytest.approx(p.magnitude.item(), rel=1e-12, abs=1e-15)
    assert sum(r.topology for r in report.rows) == pytest.approx(p.topology.item(), rel=1e-12, abs=1e-15)
    assert reg.is_mappable() == all(row.is_mappable for row in report.rows)


@pytest.mark.parametrize("rows", [1, 257, 520])  # 2**20 elements a batch: weights under, over and far over one
def test_report_rows_are_each_weights_own_whatever_their_size(rows):
    from nwave_param.core import report as report_module

    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(4096, rows), nn.Linear(rows, rows), nn.Linear(4096, rows)), 3)
    reg = nwp.register(model)
    assert any(w.numel() > report_module._BATCH for w in reg.latent_weights()) == (rows > 256)
    for row, weight in zip(reg.report().rows, reg.latent_weights()):
        weight, g = weight.detach(), reg.spec.group_size
        blocks = [weight[start : start + g] for start in range(0, weight.shape[0], g)]  # a Linear's rows, 5 at a time
        assert row.numel == weight.numel() and row.out_of_range == int((weight.abs() > reg.spec.limit).sum())
        assert row.block_columns == len(blocks) * weight.shape[1]
        assert row.mixed_block_columns == sum(int(((b > 0).any(0) & (b < 0).any(0)).sum()) for b in blocks)


def test_report_rows_sum_over_several_weights_and_render():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(6, 11), nn.GRU(11, 7), nn.Linear(7, 3)), 6)
    reg = nwp.register(model)
    report = reg.report()
    p = reg.penalty_terms()
    assert sum(r.magnitude for r in report.rows) == pytest.approx(p.magnitude.item(), rel=1e-5)
    assert sum(r.topology for r in report.rows) == pytest.approx(p.topology.item(), rel=1e-5)
    text = str(report)
    lines = text.splitlines()
    assert "NOT mappable" in lines[0] and lines[-1].startswith("total")
    assert all(name in text for name in reg.names)
    assert len({len(line) for line in lines[1:]}) == 1  # aligned: every column right-justified to one width
    assert len(report) == len(reg.names) and list(report) == report.rows and report[0] is report.rows[0]
    data = report.to_dict()
    assert data["mappable"] is False and [w["name"] for w in data["rows"]] == reg.names
    assert data["totals"]["numel"] == sum(p.numel() for p in reg.latent_weights())


def test_worked_example_projection_and_tie_keeps_positive():
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]))
    reg = nwp.register(model)
    report = reg.report()
    assert (report.rows[0].out_of_range, report.rows[0].mixed_block_columns, report.rows[0].block_columns) == (2, 2, 2)
    reg.project_()
    # column 0 clamps to [0.5, -0.2, 0.9]: P=1.4 > Q=0.2, the negative goes;
    # column 1 clamps to [-0.9, 0.3, 0.1]: Q=0.9 > P=0.4, the positives go.
    expected = torch.tensor([[0.5, -0.9], [0.0, 0.0], [0.9, 0.0]])
    assert torch.equal(model.weight, expected.to(model.weight.dtype).clamp(-0.9, 0.9))

    tie = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        tie.weight.copy_(torch.tensor([[0.25], [-0.25]]))
    nwp.register(tie).project_()
    assert tie.weight.flatten().tolist() == [0.25, 0.0]


def test_mappable_weight_is_left_bit_identical_including_negative_zero():
    model = nn.Linear(3, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.9, -0.0, -0.3], [0.1, -0.0, -0.9], [0.0, -0.2, -0.1], [0.5, 0.0, 0.0]]))
    before = model.weight.detach().clone()
    reg = nwp.register(model)
    assert reg.is_mappable()
    reg.project_()
    assert torch.equal(model.weight.view(torch.int32), before.view(torch.int32))


def test_limit_is_exact_in_low_precision():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = nn.Linear(1, 3, bias=False).to(dtype)
        with torch.no_grad():
            model.weight.copy_(torch.tensor([[0.9], [1.0], [0.95]]))
        reg = nwp.register(model)
        reg.project_()
        assert (model.weight.double().abs() <= 0.9).all(), dtype
        assert reg.is_mappable() and reg.penalty_terms().magnitude.item() == 0


def test_nonfinite_weights_are_counted_and_refused():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
        model[1].weight[1, 1] = float("inf")
    reg = nwp.register(model)
    before = [w.detach().clone() for w in reg.latent_weights()]
    assert reg.report().rows[1].nonfinite == 2 and not reg.is_mappable()
    assert math.isnan(reg.penalty_terms().magnitude.item())  # propagated, not silently zero
    with pytest.raises(ValueError, match=r"1\.weight"):
        reg.project_()
    for old, new in zip(before, reg.latent_weights()):
        assert torch.equal(old.nan_to_num(), new.nan_to_num()) and torch.equal(old.isnan(), new.isnan())
    assert reg.report().to_dict()["rows"][1]["magnitude"] is None


def test_project_keeps_parameter_identity_for_optimizers():
    model = nn.Linear(4, 6)
    with torch.no_grad():
        model.weight.mul_(10)
    reg = nwp.register(model)
    param = model.weight
    reg.project_()
    assert model.weight is param and model.parametrizations.weight.original is param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_range_exactly_when_the_magnitude_penalty_is_zero(dtype):
    # float32(0.3) lies above 0.3: torch, the penalties and the report all read the limit as float32
    spec = nwp.ChipSpec(limit=0.3)
    model = nn.Linear(1, 4, bias=False).to(dtype)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3], [-0.3], [0.2], [0.5]]))
    reg = nwp.register(model, spec)
    reg.project_()
    weight = model.weight.detach()
    assert bool((weight.abs() <= 0.3).all())  # torch's own comparison agrees
    assert reg.penalty_terms().magnitude.item() == 0 and reg.is_mappable()
    with torch.no_grad():
        model.weight[3] = torch.nextafter(model.weight[0], torch.tensor(1.0, dtype=dtype))
    assert (reg.penalty_terms().magnitude.item() > 0) == (reg.report().rows[0].out_of_range > 0)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_unprojectable_names_exactly_the_weights_holding_nan_or_infinity(shape, dtype, bad, seed):
    weight = (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1e3).to(dtype)
    for where, value in bad:
        weight.view(-1)[int(where * weight.numel())] = value
    finite = torch.ones(2, 2, dtype=dtype)
    problems = unprojectable(["w", "ok"], [weight, finite])
    assert problems == ([] if bool(torch.isfinite(weight).all()) else ["w holds NaN or infinite values"])



def _numbers(values):
    """Python numbers, NaN equal to itself (a batch and a weight alone may carry different NaN
    payloads; the report's float is nan either way)."""
    return tuple("nan" if isinstance(v, float) and math.isnan(v) else v for v in values)


def _alone(weight, layout, spec, total):
    """One weight's numbers as the definitions give them, one weight at a time."""
    magnitude, topology = functional.weight_sums(weight, layout, spec, 2)
    return (
        weight.abs().max().item() if weight.numel() else 0.0,
        int((weight.abs() > functional.bound(weight.dtype, spec.limit)).sum()),
        int((~torch.isfinite(weight)).sum()),
        int(functional.mixed_blocks(weight, layout, spec).sum()),
        int(functional.off_grid(weight, spec).sum()),
        (magnitude / max(total, 1)).item(),
        (topology / max(total, 1)).item(),
    )


@settings(max_examples=60, deadline=None)
@given(
    shape_layout=st.sampled_from([
        ((1, 1), nwp.Layout()), ((7, 3), nwp.Layout()), ((12, 2), nwp.Layout(gates=4)), ((6, 4, 3), nwp.Layout(groups=2)),
        ((4, 3, 2, 2), nwp.Layout(groups=2, transposed=True)), ((0, 3), nwp.Layout()), ((64, 64), nwp.Layout(gates=4)),
    ]),
    count=st.integers(2, 40),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    spec=st.builds(nwp.ChipSpec, limit=st.sampled_from([0.9, 1.66]), group_size=st.sampled_from([1, 3, 5]),
                   bits=st.sampled_from([None, 3, 5])),
    special=st.sampled_from([None, math.nan, math.inf, -0.0]),
    seed=st.integers(0, 2**16),
)
def test_weights_measured_together_give_each_weights_own_row(shape_layout, count, dtype, spec, special, seed):
    """Many small weights of one shape are measured in one batch: each row holds exactly the
    numbers the definitions give that weight alone."""
    shape, layout = shape_layout
    generator = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(dtype) for _ in range(count)]
    if special is not None and weights[0].numel():
        weights[count // 2].view(-1)[0] = special
    weights.append(torch.randn(3, 5, dtype=dtype))  # another shape: measured alone, beside the batch
    layouts = [layout] * count + [nwp.Layout()]
    names = [f"w{i}.weight" for i in range(len(weights))]
    report = build_report(names, weights, layouts, spec, 2, assumed={"w1.weight"})
    total = sum(w.numel() for w in weights)
    for name, weight, lay, row in zip(names, weights, layouts, report.rows):
        assert (row.name, row.shape, row.layout, row.assumed) == (name, tuple(weight.shape), lay, name == "w1.weight")
        measured = (row.max_abs, row.out_of_range, row.nonfinite, row.mixed_block_columns, row.off_grid, row.magnitude, row.topology)
        assert _numbers(measured) == _numbers(_alone(weight, lay, spec, total)), name
