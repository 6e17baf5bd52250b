"""The penalties' fast path against the formulas it implements, on every route a weight takes.

``functional.penalty_sums`` is the formula op by op (and what ``torch.compile`` traces); the
fast path packs small plain weights, chunks large ones and sends the short last block of a large
weight to a pack.  The thresholds are lowered here so that small test weights take every route.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layers import scaled

import nwave_param as nwp
from nwave_param import _engine, functional
from nwave_param.layout import Layout

LAYOUTS = [Layout(), Layout(gates=4), Layout(groups=2), Layout(groups=2, transposed=True)]


@pytest.fixture(params=["packed", "chunked", "chunked-small"])
def route(request, monkeypatch):
    """packed: every weight in one pack; chunked: every weight direct, in chunks of a few blocks."""
    if request.param != "packed":
        monkeypatch.setattr(_engine, "_SMALL", 0)
    if request.param == "chunked-small":
        monkeypatch.setattr(_engine, "_CHUNK", 8)
    _engine._plan.cache_clear()
    yield request.param
    _engine._plan.cache_clear()


def shaped(layout, a, b):
    """A weight shape the layout accepts."""
    rows = 4 * b * layout.groups
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
    result = _engine.penalty_sums(leaves, layouts, spec, power, scales=scales)
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
    magnitude, topology = _engine.penalty_sums([weight], [Layout()], nwp.ChipSpec(), 2)
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
    got = _engine.penalty_sums([weight], [Layout()], nwp.ChipSpec(), 2)
    for value, truth in zip(got, exact):
        assert abs(value.double().item() - truth.item()) <= 1e-6 * abs(truth.item())


def test_double_backward_differentiates_the_formulas():
    torch.manual_seed(0)
    weight = (torch.randn(7, 4, dtype=torch.float64) * 2).requires_grad_()
    spec = nwp.ChipSpec(limit=0.5)
    penalty = _engine.penalty_sums([weight], [Layout()], spec, 2, scales=(1.0, 1.0))
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
        return _engine.penalty_sums([w], [Layout()], spec, 2, scales=(1.0, 1.0))

    leaf = weight.clone().requires_grad_()
    penalty(leaf).backward()
    torch.testing.assert_close(torch.func.grad(penalty)(weight), leaf.grad)
    batched = torch.func.vmap(torch.func.grad(penalty))(torch.stack([weight, -weight]))
    torch.testing.assert_close(batched[0], leaf.grad)


def test_registry_penalty_under_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = scaled(torch.nn.Sequential(torch.nn.Linear(12, 11), torch.nn.Linear(11, 7)), 3)
    reg = nwp.register(model)
    expected = reg.penalty()
    compiled = torch.compile(lambda: reg.penalty(), fullgraph=True)  # a graph break would raise
    torch.testing.assert_close(compiled(), expected)
    grads = torch.autograd.grad(compiled(), reg.weights())
    torch.testing.assert_close(grads, torch.autograd.grad(reg.penalty(), reg.weights()))
