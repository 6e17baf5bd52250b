"""The fast kernels against the definition they replace: same sums, same gradients."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwave_param import functional, kernels
from nwave_param.layout import Layout

LAYOUTS = [Layout(), Layout(gates=4), Layout(groups=2), Layout(groups=2, transposed=True)]


def shaped(layout, a, b):
    """A weight shape the layout accepts: (rows, a, 2) or, transposed, (2a, rows/groups, 2)."""
    rows = 4 * b * layout.groups
    return (2 * a, rows // layout.groups, 2) if layout.transposed else (rows, a * layout.groups, 2)


def both(weights, layouts, limit, power, group_size, scales=None):
    """(values, gradients) of the reference engine and of the kernels' engine.

    With ``scales=None`` the loss is 1.5 * magnitude + 0.7 * topology of the two penalties;
    else the engines' own combined penalty."""
    results = []
    for engine in (functional.reference_engine, kernels.engine):
        leaves = [w.detach().clone().requires_grad_(w.requires_grad) for w in weights]
        runs = [lay.runs(lay.rows(w.shape), group_size) for w, lay in zip(leaves, layouts)]
        count = max(sum(w.numel() for w in leaves), 1)
        out = engine(leaves, layouts, runs, limit, power, count, scales)
        values = tuple(out) if scales is None else (out,)
        if any(w.requires_grad for w in leaves):
            (1.5 * out.magnitude + 0.7 * out.topology if scales is None else out).backward()
        results.append((values, [w.grad for w in leaves]))
    return results


@pytest.fixture(params=["native", "torch"])
def path(request, monkeypatch):
    """Run a test through the C kernels and through the torch-op fallback."""
    if request.param == "torch":
        monkeypatch.setattr(kernels.native, "library", lambda: None)
    elif kernels.native.library() is None:
        pytest.skip("no C compiler here: the C kernels cannot be built")
    return request.param


def assert_same(results, dtype):
    (values_a, grads_a), (values_b, grads_b) = results
    tolerance = dict(rtol=1e-2, atol=1e-2) if dtype in (torch.bfloat16, torch.float16) else {}
    for a, b in zip(values_a, values_b):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, equal_nan=True, **tolerance)
    for a, b in zip(grads_a, grads_b):
        if a is None or b is None:  # an empty weight may get no gradient or an empty one
            assert (a if b is None else b) is None or (a if b is None else b).numel() == 0
        else:
            torch.testing.assert_close(a, b, equal_nan=True, **tolerance)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layout=st.sampled_from(LAYOUTS),
    a=st.integers(1, 3),
    b=st.integers(1, 4),
    copies=st.integers(1, 4),
    scale=st.sampled_from([0.1, 1.0, 3.0]),
    zeros=st.booleans(),
    power=st.sampled_from([1, 2]),
    group_size=st.integers(1, 7),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    scales=st.sampled_from([None, (1.5, 0.7), (0.0, 2.0)]),
)
def test_kernels_match_definition(path, layout, a, b, copies, scale, zeros, power, group_size, dtype, seed, scales):
    generator = torch.Generator().manual_seed(seed)
    shape = shaped(layout, a, b)
    weights = []
    for _ in range(copies):  # equal shapes are stacked by the kernels
        w = torch.randn(shape, generator=generator, dtype=dtype) * scale
        if zeros:
            w[torch.rand(shape, generator=generator) < 0.3] = 0.0
        weights.append(w.requires_grad_())
    assert_same(both(weights, [layout] * copies, 0.9, power, group_size, scales), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_definition(dtype):
    torch.manual_seed(0)
    weights = [(torch.randn(12, 7) * 2).to(dtype).requires_grad_() for _ in range(3)]
    results = both(weights, [Layout()] * 3, 0.9, 2, 5)
    assert results[1][0][0].dtype == torch.float32
    assert_same(results, dtype)


def test_large_weights_are_processed_alone_and_match(path):
    torch.manual_seed(0)
    weights = [torch.randn(301, 300, requires_grad=True) for _ in range(2)]  # above the stacking size
    assert weights[0].numel() > kernels._STACK_NUMEL
    assert_same(both(weights, [Layout()] * 2, 0.9, 2, 5), torch.float32)


def test_mixed_requires_grad_and_empty(path):
    torch.manual_seed(0)
    weights = [torch.randn(6, 4, requires_grad=True), torch.randn(6, 4), torch.zeros(0, 4, requires_grad=True)]
    results = both(weights, [Layout()] * 3, 0.9, 2, 5)
    assert results[1][1][1] is None  # no gradient for a frozen weight
    assert_same(results, torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights_propagate(path, bad):
    weight = torch.randn(6, 4)
    weight[0, 0] = bad
    (magnitude, topology), _ = both([weight.requires_grad_()], [Layout()], 0.9, 2, 5)[1]
    assert not torch.isfinite(magnitude)  # min(P, Q) may stay finite beside an infinite P
    assert torch.isnan(topology) == (bad != bad)


def test_ties_and_zeros_follow_autograd_of_the_definition(path):
    # column 0 ties (P = Q = 0.5); column 1 holds zeros beside both signs; column 2 is all zero.
    weight = torch.tensor(
        [[0.5, 0.0, 0.0], [-0.25, 0.3, 0.0], [-0.25, -0.3, 0.0], [0.0, 0.1, 0.0]], dtype=torch.float64, requires_grad=True
    )
    assert_same(both([weight], [Layout()], 0.9, 2, 5), torch.float64)


def test_without_a_compiler_the_torch_path_runs_with_a_warning(tmp_path):
    """A fresh process with no usable C compiler and an empty cache still computes the penalties."""
    script = (
        "import warnings, torch, nwave_param as nwp\n"
        "model = torch.nn.Linear(7, 6)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    value = nwp.register(model).penalty()\n"
        "value.backward()\n"
        "assert any('C kernels unavailable' in str(w.message) for w in caught), caught\n"
        "assert model.weight.grad is not None and torch.isfinite(value)\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-compiler"), "NWAVE_PARAM_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
