"""Layers of every kind the registry supports, with seeded values, and ``scaled``; ``same_bits`` and
``snapshot``, to tell that nothing changed: shared by the tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

DTYPE = torch.float64

HIDDEN = st.sampled_from([1, 2, 3, 4, 6, 7, 8, 9, 11])  # never divisible by 5


def scaled(model: nn.Module, factor: float) -> nn.Module:
    """``model`` with every parameter multiplied by ``factor`` (in place): weights past the limit."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


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


def outputs(model, seed=0):
    """The model's outputs on a seeded input, for every kind :func:`make_model` builds (for
    ``mixed``, each submodule that has a forward; ``Custom`` has none, so its weights stand in)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=DTYPE)

    def run(m):
        if isinstance(m, nn.Linear):
            return [m(randn(2, m.in_features))]
        if isinstance(m, nn.Bilinear):
            return [m(randn(2, m.in1_features), randn(2, m.in2_features))]
        if isinstance(m, (nn.modules.conv._ConvNd)):
            return [m(randn(1, m.in_channels, *(4 for _ in m.kernel_size)))]
        if isinstance(m, nn.RNNBase):
            out, state = m(randn(3, 2, m.input_size))
            return [out, *(state if isinstance(state, tuple) else (state,))]
        if isinstance(m, nn.modules.rnn.RNNCellBase):
            out = m(randn(2, m.input_size))
            return list(out) if isinstance(out, tuple) else [out]
        if isinstance(m, Custom):
            return [m.weight, m.proj_weight, m.weight_extra, m.mix_weights]
        return []

    with torch.no_grad():
        if isinstance(model, nn.Sequential):
            return [out for m in model for out in run(m)]
        return run(model)


def same_bits(a, b):
    """Equal bit for bit: -0.0 differs from 0.0, a NaN equals the same NaN."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bytes(a), _bytes(b))


def _bytes(t):
    """The bytes of ``t``'s elements in logical order, whatever its strides."""
    return t.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def weight_name(key):
    """The name a weight has in the plain model: ``fc.parametrizations.weight.original`` is ``fc.weight``."""
    return key.replace("parametrizations.", "").replace(".original", "")


def cloned_state(model_or_state):
    """A state_dict, a model's or the one given, with every tensor cloned: what it holds now, in its order."""
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return {key: value.detach().clone() if isinstance(value, torch.Tensor) else value for key, value in state.items()}


def snapshot(model):
    """The model's state_dict (keys in order, values cloned) and every module's name and class."""
    return cloned_state(model), [(name, type(module)) for name, module in model.named_modules()]


def assert_same_snapshot(before, after):
    """The same keys in the same order, every value the same bit for bit, the same modules of the same classes."""
    (state_a, modules_a), (state_b, modules_b) = before, after
    assert list(state_a) == list(state_b)
    for key, a in state_a.items():
        b = state_b[key]
        assert same_bits(a, b) if isinstance(a, torch.Tensor) else a == b, key
    assert modules_a == modules_b
