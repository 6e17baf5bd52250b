"""Property tests: the penalties against a direct, independent computation of the spec.

The reference below is written from the spec alone; it never calls nwave_param internals
(``nwave_param.functional`` / ``nwave_param.layout``).  For every tracked weight it builds the
*dense* connectivity matrix explicitly (rows = output neurons, columns = input channel x kernel
offset, zeros where a grouped convolution connects nothing), splits recurrent weights into
their gate populations, cuts each population into blocks of ``group_size`` rows and sums
``min(P, Q)`` block column by block column with plain Python loops and torch ops (so that
autograd through the reference gives the reference gradient).

Spec:
* magnitude = sum_w relu(|w| - limit) ** power / N
* topology  = sum_{b, j} min(P_bj, Q_bj) / N, P_bj = sum_{i in b} relu(M_ij), Q_bj = sum relu(-M_ij)
with N the total number of elements of the tracked weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

import nwave_param as nwp
from nwave_param.loss import topology_loss, weight_magnitude_loss

DTYPE = torch.float64
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# =============================================================================================
# The reference (written from the spec only)
# =============================================================================================

NORMS_AND_EMBEDDINGS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
    nn.Embedding, nn.EmbeddingBag,
)
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_weight_name(local):
    return local == "weight" or local.startswith("weight_") or local.endswith(("_weight", "_weights"))


def ref_tracked(model):
    """[(dotted name, module, local name)] of the weights the spec tracks, in named_parameters order.

    Call on an unregistered model.
    """
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, NORMS_AND_EMBEDDINGS):
            continue
        for local, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and is_weight_name(local):
                out.append((f"{mod_name}.{local}" if mod_name else local, module, local))
    return out


def ref_index_populations(module, local, shape):
    """The dense connectivity matrix of ``module.<local>`` as index matrices, one per population.

    Entry (i, j) is the flat index into the weight of M_ij, or -1 where M_ij is a structural
    zero (an (output, input) channel pair a grouped convolution does not connect).
    """
    shape = tuple(shape)
    K = math.prod(shape[2:])  # kernel offsets (1 for 2-dim weights)
    if isinstance(module, CONV_T):
        # weight (in, out/groups, *k); input channel ci of group g feeds outputs g*opg .. g*opg+opg-1
        g = module.groups
        n_in, opg = shape[0], shape[1]
        ipg = n_in // g
        n_out = opg * g
        rows = []
        for o in range(n_out):
            grp, oo = divmod(o, opg)
            row = [-1] * (n_in * K)
            for c in range(ipg):
                ci = grp * ipg + c
                for k in range(K):
                    row[ci * K + k] = (ci * opg + oo) * K + k  # flat index of weight[ci, oo, k]
            rows.append(row)
        populations = [rows]
    elif isinstance(module, CONV):
        # weight (out, in/groups, *k); output o of group g reads inputs g*ipg .. g*ipg+ipg-1
        g = module.groups
        n_out, ipg = shape[0], shape[1]
        opg = n_out // g
        n_in = ipg * g
        rows = []
        for o in range(n_out):
            grp = o // opg
            row = [-1] * (n_in * K)
            for c in range(ipg):
                ci = grp * ipg + c
                for k in range(K):
                    row[ci * K + k] = (o * ipg + c) * K + k  # flat index of weight[o, c, k]
            rows.append(row)
        populations = [rows]
    else:
        # neuron axis = dim 0, everything else flattened into columns
        n_out = shape[0]
        cols = math.prod(shape[1:])
        rows = [[o * cols + j for j in range(cols)] for o in range(n_out)]
        gates = 1
        if local.startswith(("weight_ih", "weight_hh")):
            if isinstance(module, (nn.LSTM, nn.LSTMCell)):
                gates = 4
            elif isinstance(module, (nn.GRU, nn.GRUCell)):
                gates = 3
        size = n_out // gates
        assert size * gates == n_out
        populations = [rows[q * size:(q + 1) * size] for q in range(gates)]
    idx = [torch.tensor(p, dtype=torch.long).reshape(len(p), -1) for p in populations]
    # sanity of the reference: every weight element appears exactly once in the dense matrix
    seen = torch.cat([i[i >= 0] for i in idx])
    assert torch.equal(seen.sort().values, torch.arange(math.prod(shape)))
    return idx


def dense(weight, idx):
    """The dense matrix M: weight elements where idx >= 0, explicit zeros elsewhere."""
    flat = weight.reshape(-1)
    zero = torch.zeros((), dtype=weight.dtype)
    return torch.where(idx >= 0, flat[idx.clamp(min=0)], zero)


def blocks(n_rows, group_size):
    """Consecutive row blocks of group_size; the last one may be shorter."""
    return [list(range(s, min(s + group_size, n_rows))) for s in range(0, n_rows, group_size)]


def ref_sums(tracked, limit, power, group_size):
    """(magnitude sum, topology sum, N) as differentiable float64 tensors."""
    mag = torch.zeros((), dtype=DTYPE)
    top = torch.zeros((), dtype=DTYPE)
    n = 0
    for _, module, local in tracked:
        w = getattr(module, local)
        n += w.numel()
        for value in w.reshape(-1):
            mag = mag + torch.relu(torch.abs(value) - limit).pow(power)
        for idx in ref_index_populations(module, local, w.shape):
            m = dense(w, idx)
            for rows in blocks(m.shape[0], group_size):
                p = sum(torch.relu(m[i]) for i in rows)   # one entry per column j
                q = sum(torch.relu(-m[i]) for i in rows)
                top = top + torch.minimum(p, q).sum()
    return mag, top, n


def ref_penalties(tracked, limit=0.9, power=2, group_size=5):
    mag, top, n = ref_sums(tracked, limit, power, group_size)
    return mag / n, top / n


def ref_block_columns(tracked, group_size):
    """For every tracked weight and every block column: the flat indices of its connected entries."""
    out = []
    for _, module, local in tracked:
        w = getattr(module, local)
        cols = []
        for idx in ref_index_populations(module, local, w.shape):
            for rows in blocks(idx.shape[0], group_size):
                for j in range(idx.shape[1]):
                    ks = idx[rows, j]
                    ks = ks[ks >= 0]
                    if len(ks):
                        cols.append(ks)
        out.append(cols)
    return out


def ref_constraints_hold(tracked, limit, group_size):
    """(every |w| <= limit, every block column single-signed)."""
    mag_ok, top_ok = True, True
    for (_, module, local), cols in zip(tracked, ref_block_columns(tracked, group_size)):
        flat = getattr(module, local).detach().reshape(-1)
        mag_ok &= bool((flat.abs() <= limit).all())
        for ks in cols:
            v = flat[ks]
            top_ok &= not (bool((v > 0).any()) and bool((v < 0).any()))
    return mag_ok, top_ok


# =============================================================================================
# Models and values
# =============================================================================================

HIDDEN = st.sampled_from([1, 2, 3, 4, 6, 7, 8, 9, 11])  # never divisible by 5


class Custom(nn.Module):
    """Parameter names that are / are not tracked, outside any standard layer."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(3, 2, 2))        # tracked, dim 0 = neurons
        self.proj_weight = nn.Parameter(torch.zeros(4, 3))      # tracked
        self.weight_extra = nn.Parameter(torch.zeros(2, 3, 2))  # tracked
        self.mix_weights = nn.Parameter(torch.zeros(6, 2))      # tracked
        self.weights = nn.Parameter(torch.zeros(3, 3))          # not tracked (name)
        self.weight_vec = nn.Parameter(torch.zeros(4))          # not tracked (1 dim)
        self.bias = nn.Parameter(torch.zeros(3))                # not tracked


def conv_cfg(draw, dims, transposed):
    mode = draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    if mode == "plain":
        g, ipg, opg = 1, draw(st.integers(1, 3)), draw(st.integers(1, 4))
    elif mode == "grouped":
        g, ipg, opg = draw(st.integers(2, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    else:
        g, ipg, opg = draw(st.integers(2, 4)), 1, draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 3 if dims == 1 else 2)) for _ in range(dims))
    return dict(mode=mode, groups=g, in_channels=g * ipg, out_channels=g * opg, kernel_size=k)


@st.composite
def model_cfgs(draw, kind):
    if kind == "linear":
        return dict(kind=kind, i=draw(st.integers(1, 6)), o=draw(st.integers(1, 12)))
    if kind == "bilinear":
        return dict(kind=kind, i1=draw(st.integers(1, 3)), i2=draw(st.integers(1, 3)), o=draw(st.integers(1, 9)))
    if kind in ("conv1d", "conv2d", "conv3d", "convT1d", "convT2d", "convT3d"):
        return dict(kind=kind, **conv_cfg(draw, int(kind[-2]), kind.startswith("convT")))
    if kind in ("lstm", "lstm_full"):
        hidden = draw(HIDDEN.filter(lambda h: h >= 2) if kind == "lstm_full" else HIDDEN)
        full = kind == "lstm_full"
        return dict(
            kind=kind,
            input_size=draw(st.integers(1, 4)),
            hidden_size=hidden,
            num_layers=2 if full else draw(st.integers(1, 2)),
            bidirectional=True if full else draw(st.booleans()),
            proj_size=draw(st.integers(1 if full else 0, hidden - 1)),
        )
    if kind in ("gru", "rnn"):
        return dict(
            kind=kind,
            input_size=draw(st.integers(1, 4)),
            hidden_size=draw(HIDDEN),
            num_layers=draw(st.integers(1, 2)),
            bidirectional=draw(st.booleans()),
        )
    if kind in ("lstmcell", "grucell", "rnncell"):
        return dict(kind=kind, input_size=draw(st.integers(1, 4)), hidden_size=draw(HIDDEN))
    if kind == "mixed":
        return dict(kind=kind, i=draw(st.integers(1, 4)), o=draw(st.integers(1, 7)))
    raise AssertionError(kind)


def make_model(cfg):
    kind = cfg["kind"]
    if kind == "linear":
        m = nn.Linear(cfg["i"], cfg["o"])
    elif kind == "bilinear":
        m = nn.Bilinear(cfg["i1"], cfg["i2"], cfg["o"])
    elif kind.startswith("conv"):
        cls = {
            "conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d,
            "convT1d": nn.ConvTranspose1d, "convT2d": nn.ConvTranspose2d, "convT3d": nn.ConvTranspose3d,
        }[kind]
        m = cls(cfg["in_channels"], cfg["out_channels"], cfg["kernel_size"], groups=cfg["groups"])
    elif kind in ("lstm", "lstm_full"):
        args = {k: cfg[k] for k in ("input_size", "hidden_size", "num_layers", "bidirectional", "proj_size")}
        m = nn.LSTM(**args)
    elif kind in ("gru", "rnn"):
        args = {k: cfg[k] for k in ("input_size", "hidden_size", "num_layers", "bidirectional")}
        m = (nn.GRU if kind == "gru" else nn.RNN)(**args)
    elif kind in ("lstmcell", "grucell", "rnncell"):
        cls = {"lstmcell": nn.LSTMCell, "grucell": nn.GRUCell, "rnncell": nn.RNNCell}[kind]
        m = cls(cfg["input_size"], cfg["hidden_size"])
    elif kind == "mixed":
        m = nn.Sequential(
            nn.Linear(cfg["i"], cfg["o"]),
            nn.LayerNorm(cfg["o"]),
            nn.Embedding(5, 3),
            nn.GroupNorm(1, 2),
            nn.BatchNorm1d(3),
            Custom(),
            nn.Conv1d(2, 4, 2, groups=2),
            nn.GRUCell(2, 3),
        )
    else:
        raise AssertionError(kind)
    return m.double()


KINDS = [
    "linear", "bilinear", "conv1d", "conv2d", "conv3d", "convT1d", "convT2d", "convT3d",
    "lstm", "lstm_full", "gru", "rnn", "lstmcell", "grucell", "rnncell", "mixed",
]

values_cfgs = st.fixed_dictionaries(
    dict(
        seed=st.integers(0, 2**31 - 1),
        scale=st.one_of(st.sampled_from([0.5, 1.0, 2.0]), st.floats(0.05, 3.0)),
        special=st.sampled_from([0.0, 0.1, 0.3, 0.6]),  # fraction of exact 0 / +-limit entries
    )
)
limits = st.one_of(st.sampled_from([0.9, 0.5, 1.25]), st.floats(0.05, 2.0))
group_sizes = st.integers(1, 7)
powers = st.sampled_from([1, 2])


def fill(model, vcfg, limit):
    """Seeded values for every parameter: N(0, scale^2), with some exact 0 and exact +-limit."""
    gen = torch.Generator().manual_seed(vcfg["seed"])
    with torch.no_grad():
        for p in model.parameters():
            v = torch.randn(p.shape, generator=gen, dtype=DTYPE) * vcfg["scale"]
            u = torch.rand(p.shape, generator=gen, dtype=DTYPE)
            s = torch.where(torch.rand(p.shape, generator=gen, dtype=DTYPE) < 0.5, -1.0, 1.0).to(DTYPE)
            v = torch.where(u < vcfg["special"] / 2, torch.zeros((), dtype=DTYPE), v)
            v = torch.where((u >= vcfg["special"] / 2) & (u < vcfg["special"]), s * limit, v)
            p.copy_(v)


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
    got = reg.penalties()
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
    p = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power).penalties()
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
    p = reg.penalties()
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
    p = reg.penalties()
    assert p.magnitude.item() == 0.0
    assert p.topology.item() == 0.0

    # one element over the limit -> magnitude > 0
    _, module, local = tracked[0]
    w = getattr(module, local)
    with torch.no_grad():
        saved = w.clone()
        w.view(-1)[0] = -limit * 1.5
    assert reg.penalties().magnitude > 0
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
        p = reg.penalties()
        assert p.topology > 0
        assert p.magnitude.item() == 0.0
    else:  # e.g. group_size 1: every block column has one entry; topology can't be violated
        assert reg.penalties().topology.item() == 0.0


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
    base = reg.penalties().topology.clone()

    def scale_all(factor):
        with torch.no_grad():
            for _, module, local in tracked:
                getattr(module, local).mul_(factor)

    scale_all(-1.0)
    assert_close(reg.penalties().topology, base)
    scale_all(-1.0)
    assert_close(reg.penalties().topology, base)  # back to W
    scale_all(c)
    assert_close(reg.penalties().topology, c * base)


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
    before = [(k, v.detach().clone()) for k, v in model.state_dict().items()]
    classes = [(n, type(m)) for n, m in model.named_modules()]
    reg = nwp.register(model, spec=nwp.ChipSpec(limit=limit, group_size=group_size), power=power)
    reg.penalty().backward()
    reg.remove()
    after = list(model.state_dict().items())
    assert [k for k, _ in after] == [k for k, _ in before]
    for (key, a), (_, b) in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key
    assert [(n, type(m)) for n, m in model.named_modules()] == classes


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=5, **SETTINGS)
@given(data=st.data(), vcfg=values_cfgs, lam=st.one_of(st.just(1.0), st.floats(0.0, 10.0)))
def test_functional_forms_equal_registry(kind, data, vcfg, lam):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model, tracked = setup(cfg, vcfg, 0.9)
    # unregistered model first: the functional forms track what register would
    unreg_mag, unreg_top = weight_magnitude_loss(model), topology_loss(model, lam)
    reg = nwp.register(model)
    p = reg.penalties()
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
    p = nwp.register(model, spec=nwp.ChipSpec(**kw)).penalties()
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
    p = nwp.register(model2, power=1).penalties()
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
