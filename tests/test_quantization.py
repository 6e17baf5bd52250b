"""Reduced precision and device mismatch: the grid projection, off-grid counts, mismatch noise, on_chip.

The grid with ``bits`` holds ``k * limit / (2**(bits-1) - 1)`` for ``|k| <= 2**(bits-1) - 1``, the
top level being the largest value of the weight's dtype within the limit.  Each block column goes
to the L1-nearest feasible point: brute force below compares the cost of keeping either sign.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layers import same_bits
from torch import nn

import nwave_param as nwp
from nwave_param import functional
from nwave_param.layout import Layout


def levels(spec, dtype):
    """The grid as plain numbers: k * step in float64, rounded to dtype, none beyond the dtype's
    largest value within the limit (the top level is that value)."""
    top = 2 ** (spec.bits - 1) - 1
    step = spec.limit / top
    values = torch.tensor([k * step for k in range(-top, top + 1)], dtype=torch.float64).to(dtype)
    held = torch.tensor(spec.limit, dtype=torch.float64 if dtype == torch.float64 else torch.float32).item()
    largest = torch.tensor(held, dtype=dtype)
    if largest.item() > held:
        largest = torch.nextafter(largest, torch.zeros_like(largest))
    return torch.maximum(torch.minimum(values, largest), -largest).index_put_((torch.tensor([0, -1]),), torch.stack([-largest, largest]))


def nearest_level(x, grid):
    """The held level nearest to x (in range); of two equally near, the one with the even k."""
    values = grid.double().tolist()
    distances = [abs(v - x) for v in values]
    nearest = min(distances)
    middle = len(values) // 2  # index of k = 0
    return min((i for i, d in enumerate(distances) if d == nearest), key=lambda i: ((i - middle) % 2, i))


def brute_force_column(column, spec, dtype):
    """The L1-nearest in-range, sign-aligned, on-grid column: for each kept sign, its cost."""
    grid = levels(spec, dtype)
    top = grid[-1].item()
    best = None
    for sign in (1.0, -1.0):  # positive first: a tie keeps the positive side
        values, cost = [], 0.0
        for x in column.double().tolist():
            if x * sign > 0:
                q = grid[nearest_level(max(-top, min(top, x)), grid)].item()
                values.append(q)
                cost += abs(x - q)
            else:
                values.append(0.0 if x != 0 else x)
                cost += abs(x)
        if best is None or cost < best[0]:
            best = (cost, values)
    return torch.tensor(best[1], dtype=dtype)


specs = st.builds(nwp.ChipSpec, limit=st.floats(0.1, 2.0), group_size=st.integers(1, 5), bits=st.integers(2, 6))


@settings(max_examples=120)
@given(
    spec=specs,
    rows=st.integers(1, 9),
    columns=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    scale=st.floats(0.1, 3.0),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
)
def test_grid_projection_is_the_l1_nearest_feasible_point(spec, rows, columns, seed, scale, dtype):
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, columns, generator=generator, dtype=torch.float64) * scale).to(dtype)
    projected = functional.project(weight, Layout(), spec)
    assert projected.dtype == dtype
    grid = set(levels(spec, dtype).tolist())
    for start in range(0, rows, spec.group_size):
        for j in range(columns):
            column, got = weight[start : start + spec.group_size, j], projected[start : start + spec.group_size, j]
            assert all(v in grid for v in got.tolist())  # on the grid, hence in range
            assert not ((got > 0).any() and (got < 0).any())  # sign-aligned
            expected = brute_force_column(column, spec, dtype)
            cost, best = (got.double() - column.double()).abs().sum(), (expected.double() - column.double()).abs().sum()
            assert cost <= best + 1e-12 * (1 + best)  # no feasible point is L1-closer, in the dtype's own levels
    assert torch.equal(functional.project(projected, Layout(), spec), projected)  # idempotent, bit for bit


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 5, 8, 12, 16])
@pytest.mark.parametrize("limit", [0.9, 1.66, 0.3])
def test_every_grid_level_is_kept_and_counted_on_the_grid(dtype, bits, limit):
    spec = nwp.ChipSpec(limit=limit, bits=bits)
    grid = levels(spec, dtype).view(-1, 1)
    assert torch.equal(functional.project(grid, Layout(), nwp.ChipSpec(limit=limit, group_size=1, bits=bits)), grid)
    assert not functional.off_grid(grid, spec).any()
    assert bool((grid.float().abs() <= torch.tensor(limit, dtype=torch.float32)).all())  # the top level is in range


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, limit", [(3, 0.3), (5, 1.66), (5, 0.9), (12, 0.9), (16, 1.0)])
def test_each_value_goes_to_the_nearest_level_its_dtype_holds(dtype, bits, limit):
    spec = nwp.ChipSpec(limit=limit, group_size=1, bits=bits)
    grid = levels(spec, dtype).double()
    generator = torch.Generator().manual_seed(bits)
    x = ((torch.rand(20000, generator=generator, dtype=torch.float64) * 2 - 1) * grid[-1]).to(dtype)
    got = functional.project(x.view(-1, 1), Layout(), spec).view(-1).double()  # one entry per block column
    above = torch.searchsorted(grid, x.double()).clamp(1, len(grid) - 1)  # the held levels around x
    nearest = torch.minimum((grid[above] - x.double()).abs(), (grid[above - 1] - x.double()).abs())
    assert torch.equal((got - x.double()).abs(), nearest)


def test_without_bits_the_projection_is_the_clamp_and_sign_rule():
    torch.manual_seed(0)
    weight = torch.randn(13, 7) * 2
    spec = nwp.ChipSpec(limit=0.9)
    projected = functional.project(weight, Layout(), spec)
    for start in range(0, 13, 5):
        block = weight[start : start + 5].clamp(-0.9, 0.9)
        keep_positive = block.clamp(min=0).sum(0) >= -block.clamp(max=0).sum(0)
        expected = torch.where(keep_positive, block.clamp(min=0), block.clamp(max=0))
        assert torch.equal(projected[start : start + 5], expected)
    assert not functional.off_grid(projected, spec).any()


def test_feasible_weights_stay_bit_identical_and_report_counts_off_grid():
    spec = nwp.ChipSpec(limit=0.9, bits=3)  # levels 0, +-0.3, +-0.6, +-0.9
    model = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.3, -0.6, 0.0], [0.6, -0.3, -0.0]]))
    before = model.weight.detach().clone()
    reg = nwp.register(model, spec)
    assert reg.is_mappable() and reg.report().totals["off_grid"] == 0
    reg.project_()
    assert torch.equal(model.weight.view(torch.int32), before.view(torch.int32))
    with torch.no_grad():
        model.weight[0, 0] = 0.31  # in range, sign-aligned, off the grid
        model.weight[1, 2] = 0.1
    report = reg.report()
    assert report.rows[0].off_grid == 2 and report.totals["off_grid"] == 2 and not reg.is_mappable()
    assert "off_grid" in str(report) and report.to_dict()["rows"][0]["off_grid"] == 2
    reg.project_()
    assert reg.is_mappable() and model.weight[0, 0].item() == pytest.approx(0.3) and model.weight[1, 2].item() == 0.0


# --- mismatch ----------------------------------------------------------------------------------


def mismatched(sigma=0.05, h=1.0):
    model = nn.Linear(200, 100)
    with torch.no_grad():
        model.weight.mul_(0.1)
    reg = nwp.register(model, nwp.ChipSpec(mismatch=sigma)).harden(h)
    return model, reg


def test_training_noise_has_the_stated_scale_and_is_fresh_per_pass():
    torch.manual_seed(0)
    model, reg = mismatched(sigma=0.05, h=0.5)
    target = functional.project(reg.latent_weights()[0].detach(), Layout(), reg.spec)
    latent = reg.latent_weights()[0].detach()
    expected = latent + 0.5 * (target - latent)
    first = (model.weight - expected).detach()
    second = (model.weight - expected).detach()
    # 20000 draws: the sample std lies within 2% of h * sigma far beyond 5 standard errors
    assert abs(first.std().item() - 0.5 * 0.05) < 0.02 * 0.5 * 0.05
    assert abs(first.mean().item()) < 5 * 0.5 * 0.05 / 20000**0.5
    assert not torch.equal(first, second)  # fresh per forward pass
    with reg.cached():
        assert torch.equal(model.weight, model.weight)  # one draw per pass inside cached()


def test_no_noise_in_eval_mode_or_at_hardness_zero():
    model, reg = mismatched(h=1.0)
    model.eval()
    assert torch.equal(model.weight, model.weight)
    assert torch.equal(model.weight, functional.project(reg.latent_weights()[0].detach(), Layout(), reg.spec))
    model.train()
    reg.harden(0.0)
    assert model.weight is reg.latent_weights()[0]


def test_noise_passes_the_gradient_straight_through():
    model, reg = mismatched(h=0.7)
    factor = torch.randn(100, 200)
    (factor * model.weight).sum().backward()
    assert torch.equal(reg.latent_weights()[0].grad, factor)


@pytest.mark.parametrize("h", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_on_chip_is_one_chip_per_seed_and_restores_everything(h, mode):
    torch.manual_seed(0)
    model, reg = mismatched(sigma=0.02, h=h)
    getattr(model, mode)()
    x = torch.randn(8, 200)
    latent = reg.latent_weights()[0].detach().clone()
    chip = functional.project(latent, Layout(), reg.spec)
    with reg.on_chip(seed=7):
        first, again = model.weight.detach().clone(), model.weight.detach().clone()
        out = model(x)
    with reg.on_chip(seed=7):
        repeated = model.weight.detach().clone()
    with reg.on_chip(seed=8):
        other = model.weight.detach().clone()
    assert torch.equal(first, again) and torch.equal(first, repeated) and not torch.equal(first, other)
    assert abs((first - chip).std().item() - 0.02) < 0.002
    assert torch.equal(out, nn.functional.linear(x, first, model.bias))
    assert torch.equal(reg.latent_weights()[0], latent) and reg.hardness == h and model.training == (mode == "train")
    if h == 0.0:
        assert model.weight is reg.latent_weights()[0]


def test_on_chip_without_mismatch_is_the_projection_and_refuses_a_second_chip():
    model = nn.Linear(6, 5)
    with torch.no_grad():
        model.weight.mul_(5)
    reg = nwp.register(model, nwp.ChipSpec(bits=4))
    chip = functional.project(reg.latent_weights()[0].detach(), Layout(), reg.spec)
    with reg.on_chip():
        assert torch.equal(model.weight, chip)
        with pytest.raises(RuntimeError, match="already on a chip"):
            with nwp.registry_of(model).on_chip(seed=1):
                pass
        with reg.cached():
            assert torch.equal(model.weight, chip)  # the refusal left the open chip as it was
    assert model.weight is reg.latent_weights()[0]
    with reg.on_chip(seed=1):  # and closed it cleanly: a new one opens
        assert torch.equal(model.weight, chip)
    clone = None
    with reg.on_chip():
        clone = copy.deepcopy(model)
    assert clone.weight is nwp.registry_of(clone).latent_weights()[0]  # a copy made inside is not on a chip
    with pytest.raises(TypeError, match="seed"):
        with reg.on_chip(seed="7"):
            pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits, limit", [(2, 0.9), (3, 0.3), (4, 1.66), (6, 0.9), (8, 1.0)])
def test_a_value_halfway_between_two_levels_goes_to_the_even_k(dtype, bits, limit):
    spec = nwp.ChipSpec(limit=limit, group_size=1, bits=bits)
    grid = levels(spec, dtype)
    halfway = ((grid[1:].double() + grid[:-1].double()) / 2).to(dtype)
    exact = halfway.double() == (grid[1:].double() + grid[:-1].double()) / 2  # halfway points the dtype holds
    down, up = torch.full_like(halfway, -9), torch.full_like(halfway, 9)
    x = torch.cat([halfway[exact], torch.nextafter(halfway, down), torch.nextafter(halfway, up)])
    assert exact.sum() >= len(grid) // 4  # the ties are really there
    got = functional.round_to_grid(x, spec)
    expected = torch.stack([grid[nearest_level(v, grid)] for v in x.double().tolist()])
    assert torch.equal(got, expected)


def _edges(dtype):
    """Limits at the ends of what ``dtype`` holds: its smallest normal and subnormal numbers,
    1e-38 (float32's smallest normal is 1.2e-38), and near its largest number."""
    info = torch.finfo(dtype)
    subnormal = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))
    return [info.tiny, 3 * info.tiny, 64 * subnormal, 1e-38, 1e-35, 1e-30, info.max / 64, info.max]


@settings(max_examples=150)
@given(
    data=st.data(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    bits=st.sampled_from([None, 2, 3, 5, 8, 12, 16]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.5, 1.5, 4.0]),
)
def test_at_the_edges_of_each_dtype_the_engine_computes_the_definition(data, dtype, bits, seed, scale):
    """A grid whose step underflows the dtype (ChipSpec(limit=1e-38, bits=16)), a limit the dtype
    cannot hold at all, a limit near the dtype's largest number: every route computes what the
    definition does, bit for bit, and projects to a weight the definition calls mappable."""
    limit = data.draw(st.sampled_from(_edges(dtype)))
    spec = nwp.ChipSpec(limit=limit, group_size=data.draw(st.integers(1, 5)), bits=bits)
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(12, 5, generator=generator, dtype=torch.float64) * limit * scale
    value = value.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
    value[0, :3] = torch.tensor([0.0, -0.0, limit], dtype=torch.float64)
    layer = nn.Linear(5, 12, bias=False).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(value.to(dtype))
    reg = nwp.register(layer, spec).harden(1.0)
    want = functional.project(layer.parametrizations.weight.original.detach(), Layout(), spec)
    with reg.cached():
        assert same_bits(layer.weight, want)
    assert same_bits(layer.weight, want)
    reg.project_()
    assert same_bits(reg.latent_weights()[0].detach(), want) and reg.is_mappable()
