"""The engine against the definitions it implements, on every route a weight takes.

``functional.penalty_sums`` and ``functional.harden`` are the formulas op by op (and what
``torch.compile`` traces); the engine packs small weights, chunks large ones on the CPU and sends
the short last block of a large weight to a pack, and on other devices packs everything.  The
thresholds are lowered here so that small test weights take every route.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layers import same_bits, scaled

import nwave_param as nwp
from nwave_param import functional
from nwave_param._engine import hardening, penalties, plans
from nwave_param.layout import Layout

LAYOUTS = [
    Layout(), Layout(gates=4), Layout(groups=2), Layout(groups=2, transposed=True),
    Layout(inputs_first=True), Layout(gates=4, inputs_first=True),
]


@pytest.fixture(params=["packed", "chunked", "chunked-small", "other device"])
def route(request, monkeypatch):
    """packed: every weight in one pack; chunked: every weight direct, in chunks of a few blocks
    (hardened whole, by the definition); other device: planned as on a GPU, where everything is
    packed however large."""
    if request.param != "packed":
        monkeypatch.setattr(plans, "_SMALL", 0)
    if request.param == "chunked-small":
        monkeypatch.setattr(plans, "_CHUNK", 8)
    plans._plan.cache_clear()
    with plans.planned_as("cuda" if request.param == "other device" else "cpu"):
        yield request.param
    plans._plan.cache_clear()


def shaped(layout, a, b):
    """A weight shape the layout accepts."""
    rows = 4 * b * layout.groups
    if layout.inputs_first:
        return (2 * a, rows)
    return (2 * a, rows // layout.groups, 2) if layout.transposed else (rows, a * layout.groups, 2)


def reference(weights, layouts, spec, power, scales):
    """Value and gradients by autograd through the formulas."""
    leaves = [w.detach().clone().requires_grad_(w.requires_grad) for w in weights]
    magnitude, topology = functional.penalty_sums(leaves, layouts, spec, power)
    out = (1.5 * magnitude + 0.7 * topology) if scales is None else scales[0] * magnitude + scales[1] * topology
    if any(w.requires_grad for w in leaves):
        out.backward()
    return out.detach(), [w.grad for w in leaves]


def fast(weights, layouts, spec, power, scales):
    leaves = [w.detach().clone().requires_grad_(w.requires_grad) for w in weights]
    result = penalties.penalty_sums(leaves, layouts, spec, power, scales=scales)
    out = 1.5 * result[0] + 0.7 * result[1] if scales is None else result
    if any(w.requires_grad for w in leaves):
        out.backward()
    return out.detach(), [w.grad for w in leaves]


def assert_same(a, b, dtype):
    tolerance = dict(rtol=1e-2, atol=1e-3) if dtype in (torch.bfloat16, torch.float16) else {}
    torch.testing.assert_close(a[0], b[0], equal_nan=True, **tolerance)
    for x, y in zip(a[1], b[1]):
        if x is None or y is None:
            assert x is None and y is None or (x if y is None else y).numel() == 0
        else:
            assert x.dtype == y.dtype and x.shape == y.shape
            torch.testing.assert_close(x, y, equal_nan=True, **tolerance)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    count=st.integers(1, 4),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    zeros=st.booleans(),
    power=st.sampled_from([1, 2]),
    group_size=st.integers(1, 7),
    limit=st.floats(0.1, 2.0),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    scales=st.sampled_from([None, (1.5, 0.7), (0.0, 2.0), (3.0, 0.0)]),
)
def test_fast_path_equals_the_formulas(route, data, count, scale, zeros, power, group_size, limit, dtype, seed, scales):
    generator = torch.Generator().manual_seed(seed)
    layouts, weights = [], []
    for _ in range(count):
        layout = data.draw(st.sampled_from(LAYOUTS))
        shape = shaped(layout, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)))
        weight = torch.randn(shape, generator=generator, dtype=dtype) * scale
        if zeros:
            weight[torch.rand(shape, generator=generator) < 0.3] = 0.0
        weights.append(weight.requires_grad_(data.draw(st.booleans()) or not weights))
        layouts.append(layout)
    spec = nwp.ChipSpec(limit=limit, group_size=group_size)
    assert_same(fast(weights, layouts, spec, power, scales), reference(weights, layouts, spec, power, scales), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_routes(route, dtype):
    torch.manual_seed(0)
    weights = [torch.randn(13, 7, dtype=dtype) * 2, torch.randn(6, 6, dtype=dtype), torch.randn(11, 3, dtype=dtype)]
    for w in weights:
        w.requires_grad_()
    spec = nwp.ChipSpec(limit=0.5, group_size=5)
    for scales in (None, (1.0, 1.0)):
        assert_same(fast(weights, [Layout()] * 3, spec, 2, scales), reference(weights, [Layout()] * 3, spec, 2, scales), dtype)


def test_ties_and_exact_zeros_follow_autograd_of_the_definition(route):
    # column 0 ties (P = Q = 0.5); column 1 holds zeros beside both signs; column 2 is all zero.
    weight = torch.tensor(
        [[0.5, 0.0, 0.0], [-0.25, 0.3, 0.0], [-0.25, -0.3, 0.0], [0.0, 0.1, 0.0]], dtype=torch.float64, requires_grad=True
    )
    got = fast([weight], [Layout()], nwp.ChipSpec(), 2, None)
    assert_same(got, reference([weight], [Layout()], nwp.ChipSpec(), 2, None), torch.float64)
    assert got[1][0][:, 0].tolist() == [0.35, -0.35, -0.35, 0.0]  # 0.7 * sign / 2 on the tie, 0 at the zero


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_propagate(route, bad):
    weight = torch.randn(6, 4)
    weight[0, 0] = bad
    magnitude, topology = penalties.penalty_sums([weight], [Layout()], nwp.ChipSpec(), 2)
    assert not torch.isfinite(magnitude)  # never a silent zero
    assert torch.isnan(topology) == math.isnan(bad)  # min(P, Q) stays finite beside an infinite P


def test_frozen_and_empty_weights(route):
    torch.manual_seed(0)
    weights = [torch.randn(6, 4, requires_grad=True), torch.randn(6, 4), torch.zeros(0, 4, requires_grad=True)]
    value, grads = fast(weights, [Layout()] * 3, nwp.ChipSpec(), 2, (1.0, 1.0))
    assert grads[1] is None
    assert_same((value, grads), reference(weights, [Layout()] * 3, nwp.ChipSpec(), 2, (1.0, 1.0)), torch.float32)


def test_tall_weights_sum_accurately():
    torch.manual_seed(0)
    weight = torch.randn(2_000_000, 1) * 3  # float32, chunked; P, Q and the excess all nonzero
    exact = functional.penalty_sums([weight.double()], [Layout()], nwp.ChipSpec(), 2)
    got = penalties.penalty_sums([weight], [Layout()], nwp.ChipSpec(), 2)
    for value, truth in zip(got, exact):
        assert abs(value.double().item() - truth.item()) <= 1e-6 * abs(truth.item())


def test_double_backward_differentiates_the_formulas():
    torch.manual_seed(0)
    weight = (torch.randn(7, 4, dtype=torch.float64) * 2).requires_grad_()
    spec = nwp.ChipSpec(limit=0.5)
    penalty = penalties.penalty_sums([weight], [Layout()], spec, 2, scales=(1.0, 1.0))
    (grad,) = torch.autograd.grad(penalty, weight, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), weight)
    magnitude, topology = functional.penalty_sums([weight], [Layout()], spec, 2)
    (grad_ref,) = torch.autograd.grad(magnitude + topology, weight, create_graph=True)
    (second_ref,) = torch.autograd.grad(grad_ref.square().sum(), weight)
    torch.testing.assert_close(grad, grad_ref)
    torch.testing.assert_close(second, second_ref)
    assert second.abs().sum() > 0  # the magnitude term's second derivative is 2 where |w| > limit


def test_torch_func_grad_and_vmap():
    torch.manual_seed(0)
    weight = torch.randn(6, 5, dtype=torch.float64) * 2
    spec = nwp.ChipSpec(limit=0.5)

    def penalty(w):
        return penalties.penalty_sums([w], [Layout()], spec, 2, scales=(1.0, 1.0))

    leaf = weight.clone().requires_grad_()
    penalty(leaf).backward()
    torch.testing.assert_close(torch.func.grad(penalty)(weight), leaf.grad)
    batched = torch.func.vmap(torch.func.grad(penalty))(torch.stack([weight, -weight]))
    torch.testing.assert_close(batched[0], leaf.grad)


@pytest.mark.slow
def test_registry_penalty_under_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = scaled(torch.nn.Sequential(torch.nn.Linear(12, 11), torch.nn.Linear(11, 7)), 3)
    reg = nwp.register(model)
    expected = reg.penalty()
    compiled = torch.compile(lambda: reg.penalty(), fullgraph=True)  # a graph break would raise
    torch.testing.assert_close(compiled(), expected)
    grads = torch.autograd.grad(compiled(), reg.latent_weights())
    torch.testing.assert_close(grads, torch.autograd.grad(reg.penalty(), reg.latent_weights()))


def noise_per_weight(drawn, weights, layouts, spec):
    """The noise each weight received, from what ``hardening._gaussian`` drew: one tensor per pack
    (its members' regions, the short last blocks of large weights included), then one per chunk
    of each large weight on the CPU."""
    plan = plans.plan_for(weights, layouts, spec.group_size)
    result, drawn = [None] * len(weights), iter(drawn)
    for pack in plan.packs:
        flat = next(drawn)
        for member, region in zip(pack.members, pack.regions(flat)):
            i = member.index
            result[i] = torch.zeros_like(weights[i]) if result[i] is None else result[i]
            plans.source(result[i], member).copy_(region)
    for item in plan.direct:
        i = item.index
        noise = torch.zeros_like(weights[i]) if result[i] is None else result[i]
        m = layouts[i].matrix(noise).contiguous().clone()
        for view in item.views:
            plans.blocks(m.view(-1), view).copy_(next(drawn))
        result[i] = layouts[i].unmatrix(m, weights[i].shape)
    return result


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    count=st.integers(1, 4),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    zeros=st.booleans(),
    group_size=st.integers(1, 7),
    limit=st.floats(0.1, 2.0),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
    hardness=st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(0.0, 1.0)),
    grid=st.sampled_from([None, 3, 5]),
    noise=st.sampled_from(["none", "given", "drawn"]),
)
def test_hardened_values_equal_the_definition_bit_for_bit(
    route, monkeypatch, data, count, scale, zeros, group_size, limit, dtype, seed, hardness, grid, noise
):
    generator = torch.Generator().manual_seed(seed)
    layouts, weights = [], []
    for _ in range(count):
        layout = data.draw(st.sampled_from(LAYOUTS))
        shape = shaped(layout, data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)))
        weight = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(dtype)
        if zeros:
            weight[torch.rand(shape, generator=generator) < 0.3] = 0.0
            weight[torch.rand(shape, generator=generator) < 0.1] = -0.0
        weights.append(weight.requires_grad_())
        layouts.append(layout)
    spec = nwp.ChipSpec(limit=limit, group_size=group_size, bits=grid)
    drawn = []
    gaussian = hardening._gaussian
    monkeypatch.setattr(hardening, "_gaussian", lambda like, std, dtype=None: drawn.append(gaussian(like, std, dtype)) or drawn[-1])
    given_noise = [(torch.randn(w.shape, generator=generator, dtype=torch.float64) * 0.1).to(dtype) for w in weights]
    argument = {"none": 0.0, "given": given_noise, "drawn": 0.05}[noise]
    got = hardening.harden_all(weights, layouts, spec, hardness, argument)
    noises = {
        "none": [None] * count,
        "given": given_noise,
        "drawn": noise_per_weight(drawn, weights, layouts, spec) if drawn else [None] * count,
    }[noise]
    expected = [functional.harden(w.detach(), lay, spec, hardness, n) for w, lay, n in zip(weights, layouts, noises)]
    for value, want in zip(got, expected):
        assert same_bits(value, want)
    factors = [torch.randn(w.shape, generator=generator, dtype=torch.float64).to(dtype) for w in weights]
    sum((c * v).sum() for c, v in zip(factors, got)).backward()
    assert all(torch.equal(w.grad, c) for w, c in zip(weights, factors))  # straight through, per weight


class CountedOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops dispatched to torch's kernels (views included): what a GPU launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def dispatched(fn):
    fn()  # plans and buffers are made once, on the first call
    with CountedOps() as ops:
        fn()
    return ops.count


@pytest.mark.parametrize("size", [256, 2048])
def test_off_the_cpu_the_penalty_dispatches_a_fixed_number_of_ops_whatever_the_size(size):
    model = torch.nn.Sequential(*[torch.nn.Linear(size, size) for _ in range(4)])
    reg = nwp.register(scaled(model, 3))
    with plans.planned_as("cuda"):
        count = dispatched(lambda: reg.penalty().backward())
    assert count <= 100, count
    with plans.planned_as("cuda"):
        assert dispatched(lambda: reg.penalty().backward()) == count  # the same for every call


@pytest.mark.parametrize("grid", [None, 5])
def test_off_the_cpu_the_hardened_forward_of_all_weights_dispatches_few_ops(grid):
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(24)])
    reg = nwp.register(scaled(model, 3), nwp.ChipSpec(bits=grid)).harden(0.5)

    def forward():
        with reg.cached():
            return [layer.weight for layer in model]

    with plans.planned_as("cuda"):
        count = dispatched(forward)
    assert count <= 60 + 4 * len(model), count  # a few kernels for all, and a view and a straight-through output per weight
    small = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(2)])
    reg_small = nwp.register(small, nwp.ChipSpec(bits=grid)).harden(0.5)

    def forward_small():
        with reg_small.cached():
            return [layer.weight for layer in small]

    with plans.planned_as("cuda"):
        assert count - dispatched(forward_small) <= 4 * (len(model) - len(small))  # only the per-weight part grows
