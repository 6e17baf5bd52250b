"""Property tests: the penalties against a direct, independent computation of the spec
(``tests/reference.py``, written from the spec alone), over every layer kind the registry supports.

Spec:
* magnitude = sum_w relu(|w| - limit) ** power / N
* topology  = sum_{b, j} min(P_bj, Q_bj) / N, P_bj = sum_{i in b} relu(M_ij), Q_bj = sum relu(-M_ij)
with N the total number of elements of the tracked weights.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layers import KINDS, assert_same_snapshot, fill, group_sizes, limits, make_model, model_cfgs, powers, snapshot, values_cfgs
from reference import ref_block_columns, ref_constraints_hold, ref_penalties, ref_tracked
from torch import nn
from torch.testing import assert_close

import nwave_param as nwp
from nwave_param.loss import topology_loss, weight_magnitude_loss

DTYPE = torch.float64
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def setup(cfg, vcfg, limit):
    model = make_model(cfg)
    fill(model, vcfg, limit)
    tracked = ref_tracked(model)
    return model, tracked


def scalar(t):
    assert t.dim() == 0 and t.dtype == DTYPE
    return t


# =============================================================================================
# 1. penalties == direct computation (and tracked names == spec's)
# =============================================================================================


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, power=powers)
def test_penalties_match_direct_formula(kind, data, vcfg, limit, group_size, power):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, limit)
    want_mag, want_top = ref_penalties(tracked, limit, power, group_size)
    reg = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power)
    assert reg.names == [name for name, _, _ in tracked]
    got = reg.penalty_terms()
    assert_close(scalar(got.magnitude), want_mag)
    assert_close(scalar(got.topology), want_top)


@settings(max_examples=60, **SETTINGS)
@given(
    data=st.data(),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 4)),
    limit=limits,
    group_size=group_sizes,
    power=powers,
)
def test_linear_with_drawn_values_matches_direct_formula(data, shape, limit, group_size, power):
    """Values drawn element by element, mixing arbitrary floats with exact 0 and +-limit."""
    out_f, in_f = shape
    element = st.one_of(
        st.sampled_from([0.0, limit, -limit, 0.5, -0.5]),
        st.floats(-3.0, 3.0, allow_subnormal=False),
    )
    values = data.draw(st.lists(element, min_size=out_f * in_f, max_size=out_f * in_f), label="values")
    model = nn.Linear(in_f, out_f).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(values, dtype=DTYPE).reshape(out_f, in_f))
    tracked = ref_tracked(model)
    want_mag, want_top = ref_penalties(tracked, limit, power, group_size)
    mag_ok, top_ok = ref_constraints_hold(tracked, limit, group_size)
    p = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power).penalty_terms()
    assert_close(scalar(p.magnitude), want_mag)
    assert_close(scalar(p.topology), want_top)
    assert (p.magnitude == 0).item() == mag_ok
    assert (p.topology == 0).item() == top_ok


# =============================================================================================
# 2. >= 0, and zero exactly when the constraint holds
# =============================================================================================


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=15, **SETTINGS)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, power=powers)
def test_zero_exactly_when_constraint_holds(kind, data, vcfg, limit, group_size, power):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, limit)
    reg = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power)

    # random weights: nonnegative, zero iff the constraint holds
    p = reg.penalty_terms()
    mag_ok, top_ok = ref_constraints_hold(tracked, limit, group_size)
    assert p.magnitude >= 0 and p.topology >= 0
    assert (p.magnitude == 0).item() == mag_ok
    assert (p.topology == 0).item() == top_ok

    # mappable weights: clamp to the limit, make every block column single-signed -> both exactly 0
    gen = torch.Generator().manual_seed(vcfg["seed"] + 1)
    columns = ref_block_columns(tracked, group_size)
    with torch.no_grad():
        for (_, module, local), cols in zip(tracked, columns):
            w = getattr(module, local)
            flat = w.detach().reshape(-1).clamp(-limit, limit).clone()
            for ks in cols:
                sign = 1.0 if torch.rand((), generator=gen).item() < 0.5 else -1.0
                flat[ks] = sign * flat[ks].abs()
            w.copy_(flat.reshape(w.shape))
    assert ref_constraints_hold(tracked, limit, group_size) == (True, True)
    p = reg.penalty_terms()
    assert p.magnitude.item() == 0.0
    assert p.topology.item() == 0.0

    # one element over the limit -> magnitude > 0
    _, module, local = tracked[0]
    w = getattr(module, local)
    with torch.no_grad():
        saved = w.clone()
        w.view(-1)[0] = -limit * 1.5
    assert reg.penalty_terms().magnitude > 0
    with torch.no_grad():
        w.copy_(saved)

    # one mixed-sign block column (within the limit) -> topology > 0, magnitude still 0
    mixable = [(t, ks) for t, cols in zip(tracked, columns) for ks in cols if len(ks) >= 2]
    if mixable:
        (_, module, local), ks = mixable[0]
        w = getattr(module, local)
        with torch.no_grad():
            w.view(-1)[ks[0]] = limit / 2
            w.view(-1)[ks[1]] = -limit / 3
        p = reg.penalty_terms()
        assert p.topology > 0
        assert p.magnitude.item() == 0.0
    else:  # e.g. group_size 1: every block column has one entry; topology can't be violated
        assert reg.penalty_terms().topology.item() == 0.0


# =============================================================================================
# 3. topology(-W) == topology(W), topology(cW) == c topology(W)
# =============================================================================================


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12, **SETTINGS)
@given(
    data=st.data(),
    vcfg=values_cfgs,
    limit=limits,
    group_size=group_sizes,
    c=st.one_of(st.sampled_from([1.0, 2.0, 0.5]), st.floats(0.01, 100.0)),
)
def test_topology_sign_symmetric_and_homogeneous(kind, data, vcfg, limit, group_size, c):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, limit)
    reg = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size))
    base = reg.penalty_terms().topology.clone()

    def scale_all(factor):
        with torch.no_grad():
            for _, module, local in tracked:
                getattr(module, local).mul_(factor)

    scale_all(-1.0)
    assert_close(reg.penalty_terms().topology, base)
    scale_all(-1.0)
    assert_close(reg.penalty_terms().topology, base)  # back to W
    scale_all(c)
    assert_close(reg.penalty_terms().topology, c * base)


# =============================================================================================
# 4. gradients == autograd of the direct formula
# =============================================================================================


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=12, **SETTINGS)
@given(
    data=st.data(),
    vcfg=values_cfgs,
    limit=limits,
    group_size=group_sizes,
    power=powers,
    alpha=st.one_of(st.just(1.0), st.floats(0.0, 5.0)),
    lam=st.one_of(st.just(1.0), st.floats(0.0, 5.0)),
)
def test_gradient_matches_direct_formula(kind, data, vcfg, limit, group_size, power, alpha, lam):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, limit)
    params = [getattr(module, local) for _, module, local in tracked]  # the leaf Parameters
    mag, top = ref_penalties(tracked, limit, power, group_size)
    ref = alpha * mag + lam * top
    want = torch.autograd.grad(ref, params)

    reg = nwp.register(
        model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), alpha=alpha, lam=lam, power=power
    )
    penalty = reg.penalty()
    assert_close(scalar(penalty), ref.detach())
    got = torch.autograd.grad(penalty, params)
    for name, g, w in zip(reg.names, got, want):
        assert_close(g, w, msg=lambda m, name=name: f"{name}: {m}")


# =============================================================================================
# 5. register + remove leaves the model bit-identical; functional forms
# =============================================================================================


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, power=powers)
def test_register_remove_round_trip(kind, data, vcfg, limit, group_size, power):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, _ = setup(cfg, vcfg, limit)
    before = snapshot(model)
    reg = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power)
    reg.penalty().backward()
    reg.remove()
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data(), vcfg=values_cfgs, lam=st.one_of(st.just(1.0), st.floats(0.0, 10.0)))
def test_functional_forms_equal_registry(kind, data, vcfg, lam):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, 0.9)
    # unregistered model first: the functional forms track what register would
    unreg_mag, unreg_top = weight_magnitude_loss(model), topology_loss(model, lam)
    reg = nwp.register(model)
    p = reg.penalty_terms()
    assert torch.equal(weight_magnitude_loss(model), p.magnitude)
    assert torch.equal(topology_loss(model, lam), lam * p.topology)
    assert torch.equal(unreg_mag, p.magnitude)
    assert torch.equal(unreg_top, lam * p.topology)
    want_mag, want_top = ref_penalties(tracked)
    assert_close(p.magnitude, want_mag)
    assert_close(p.topology, want_top)


# =============================================================================================
# Hand-computed cases
# =============================================================================================


def set_weight(module, name, rows):
    with torch.no_grad():
        w = getattr(module, name)
        w.copy_(torch.tensor(rows, dtype=DTYPE).reshape(w.shape))


def penalties_of(model, **kw):
    p = nwp.register(model, spec=nwp.ChipSpec(**kw)).penalty_terms()
    return p.magnitude.item(), p.topology.item()


def test_hand_worked_example():
    model = nn.Linear(2, 3).double()
    set_weight(model, "weight", [[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]])
    # N = 6. magnitude: (1.0-0.9)^2 + (1.2-0.9)^2 = 0.01 + 0.09 = 0.1 -> 0.1/6
    # one block of 3 rows; column 0: P = 0.5+1.2 = 1.7, Q = 0.2 -> 0.2
    #                      column 1: P = 0.3+0.1 = 0.4, Q = 1.0 -> 0.4;  (0.2+0.4)/6 = 0.1
    mag, top = penalties_of(model, limit=0.9, group_size=5)
    assert mag == pytest.approx(0.1 / 6, abs=1e-12)
    assert top == pytest.approx(0.1, abs=1e-12)
    assert weight_magnitude_loss(model).item() == pytest.approx(0.1 / 6, abs=1e-12)
    assert topology_loss(model, 2.0).item() == pytest.approx(0.2, abs=1e-12)


def test_hand_partial_last_block():
    model = nn.Linear(1, 7).double()
    set_weight(model, "weight", [0.5, -0.2, 0.3, -0.1, 0.4, 1.0, -2.0])
    # N = 7, group_size 5: blocks rows 0-4 and rows 5-6 (the short last block)
    # block 0: P = 0.5+0.3+0.4 = 1.2, Q = 0.2+0.1 = 0.3 -> 0.3
    # block 1: P = 1.0, Q = 2.0 -> 1.0;      topology = 1.3/7
    # magnitude: (1.0-0.9)^2 + (2.0-0.9)^2 = 0.01 + 1.21 = 1.22 -> 1.22/7
    mag, top = penalties_of(model, limit=0.9, group_size=5)
    assert mag == pytest.approx(1.22 / 7, abs=1e-12)
    assert top == pytest.approx(1.3 / 7, abs=1e-12)
    # power 1: 0.1 + 1.1 = 1.2 -> 1.2/7
    model2 = nn.Linear(1, 7).double()
    set_weight(model2, "weight", [0.5, -0.2, 0.3, -0.1, 0.4, 1.0, -2.0])
    p = nwp.register(model2, power=1).penalty_terms()
    assert p.magnitude.item() == pytest.approx(1.2 / 7, abs=1e-12)


def test_hand_lstmcell_gate_split():
    model = nn.LSTMCell(1, 2).double()  # weight_ih (8, 1), weight_hh (8, 2): 4 gates of 2 rows
    set_weight(model, "weight_ih", [1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    set_weight(model, "weight_hh", [[0.5, -0.5], [-0.25, 0.5]] + [[0.0, 0.0]] * 6)
    # N = 8 + 16 = 24, group_size 5 -> each gate population (2 rows) is one block.
    # weight_ih: every gate column single-signed -> 0
    #   (without the gate split, rows 0-4 P=3,Q=2 -> 2 and rows 5-7 P=1,Q=2 -> 1: would be 3)
    # weight_hh gate i: column 0 P=0.5,Q=0.25 -> 0.25; column 1 P=0.5,Q=0.5 -> 0.5; others 0
    # topology = 0.75/24 = 0.03125; magnitude = 8 * (1.0-0.9)^2 / 24 = 0.08/24
    mag, top = penalties_of(model, limit=0.9, group_size=5)
    assert top == pytest.approx(0.75 / 24, abs=1e-12)
    assert mag == pytest.approx(0.08 / 24, abs=1e-12)


def test_hand_grouped_conv():
    model = nn.Conv1d(4, 4, 1, groups=2, bias=False).double()  # weight (4, 2, 1)
    w = [[0.5, -0.3], [-0.2, 0.4], [1.0, 0.1], [-0.6, -0.2]]
    set_weight(model, "weight", w)
    # dense M (outputs 0,1 read inputs 0,1; outputs 2,3 read inputs 2,3):
    #   [ 0.5, -0.3,  0  ,  0  ]
    #   [-0.2,  0.4,  0  ,  0  ]
    #   [ 0  ,  0  ,  1.0,  0.1]
    #   [ 0  ,  0  , -0.6, -0.2]
    # N = 8. group_size 5 (one block): col0 min(.5,.2)=.2, col1 min(.4,.3)=.3,
    #   col2 min(1.0,.6)=.6, col3 min(.1,.2)=.1 -> 1.2/8 = 0.15
    # magnitude: (1.0-0.9)^2 = 0.01 -> 0.01/8
    mag, top = penalties_of(model, limit=0.9, group_size=5)
    assert top == pytest.approx(1.2 / 8, abs=1e-12)
    assert mag == pytest.approx(0.01 / 8, abs=1e-12)
    # group_size 3: blocks rows {0,1,2}, {3}: col0 .2, col1 .3, col2 (P=1.0, Q=0) 0, col3 (P=.1,Q=0) 0,
    #   block {3} is one row -> 0.   topology = 0.5/8
    model = nn.Conv1d(4, 4, 1, groups=2, bias=False).double()
    set_weight(model, "weight", w)
    assert penalties_of(model, limit=0.9, group_size=3)[1] == pytest.approx(0.5 / 8, abs=1e-12)
    # the local (4, 2) reading would mix groups: outputs 0 and 2 never share an input.
    # Here M is single-signed per dense column although the local columns mix signs.
    model = nn.Conv1d(4, 2, 1, groups=2, bias=False).double()  # weight (2, 2, 1)
    set_weight(model, "weight", [[0.5, -0.3], [-0.5, 0.3]])
    # dense M = [[0.5, -0.3, 0, 0], [0, 0, -0.5, 0.3]]: every column single-signed -> 0
    assert penalties_of(model, limit=0.9, group_size=5) == (0.0, 0.0)


def test_hand_transposed_conv():
    model = nn.ConvTranspose1d(2, 4, 1, groups=2, bias=False).double()  # weight (in=2, out/g=2, 1)
    set_weight(model, "weight", [[0.5, -0.3], [0.7, 0.2]])
    # input 0 (group 0) feeds outputs 0, 1; input 1 (group 1) feeds outputs 2, 3.
    # dense M (rows = outputs, columns = inputs):
    #   [ 0.5, 0  ]
    #   [-0.3, 0  ]
    #   [ 0  , 0.7]
    #   [ 0  , 0.2]
    # N = 4, one block: col0 P=.5,Q=.3 -> .3; col1 P=.9,Q=0 -> 0; topology = 0.3/4 = 0.075
    # (reading dim 0 as neurons would give col1 min(.2,.3) = .2 -> 0.05)
    mag, top = penalties_of(model, limit=0.9, group_size=5)
    assert top == pytest.approx(0.075, abs=1e-12)
    assert mag == 0.0
    # ungrouped: weight (in=2, out=2, 1), M = W^T = [[0.5, 0.7], [-0.3, 0.2]]
    #   col0 min(.5,.3) = .3, col1 min(.9, 0) = 0 -> 0.3/4; with group_size 1 every block is one row -> 0
    model = nn.ConvTranspose1d(2, 2, 1, bias=False).double()
    set_weight(model, "weight", [[0.5, -0.3], [0.7, 0.2]])
    assert penalties_of(model, limit=0.9, group_size=5)[1] == pytest.approx(0.075, abs=1e-12)
    model = nn.ConvTranspose1d(2, 2, 1, bias=False).double()
    set_weight(model, "weight", [[0.5, -0.3], [-0.7, 0.2]])
    # M = [[0.5, -0.7], [-0.3, 0.2]]: col0 min(.5,.3)=.3, col1 min(.2,.7)=.2 -> 0.5/4
    assert penalties_of(model, limit=0.9, group_size=5)[1] == pytest.approx(0.125, abs=1e-12)


# =============================================================================================
# 6. inside cached(), the penalty reuses the hardening's packs: the same values and gradients
# =============================================================================================


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=10, **SETTINGS)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, power=powers, hardness=st.floats(0.05, 1.0))
def test_the_penalty_inside_a_cached_pass_is_the_penalty_outside_it_bit_for_bit(kind, data, vcfg, limit, group_size, power, hardness):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, limit)
    mag, top = ref_penalties(tracked, limit, power, group_size)  # of the latent weights, before registering
    reg = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power).harden(hardness)
    params = reg.latent_weights()
    alone = reg.penalty()
    alone_grads = torch.autograd.grad(alone, params)
    with reg.cached():
        for _, module, local in tracked:  # the pass hardens every weight, together
            getattr(module, local)
        shared = reg.penalty()
        shared_grads = torch.autograd.grad(shared, params)
    assert torch.equal(shared, alone)
    for name, a, b in zip(reg.names, shared_grads, alone_grads):
        assert torch.equal(a, b), name
    assert_close(alone, (mag + top).detach())
