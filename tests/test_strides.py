"""Every route computes the definition's values whatever a weight's strides and memory format.

A Parameter need not be contiguous: ``model.to(memory_format=torch.channels_last)`` reorders a
convolution's weight, a transposed or sliced tensor can be made a Parameter, and a state_dict can
hold views.  The engine reads a weight in pieces (an LSTM gate, a convolution group, a transposed
convolution's output channels, the short last block of a large weight), and each piece must be
read through the weight's own strides.  Here random layers get random memory layouts (dims
permuted in memory, steps, a storage offset, channels_last), and every value the engine, the
registry and the offline API compute is compared, bit for bit, with the definition
(:mod:`nwave_param.functional`) run on a contiguous copy.
"""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from layers import conv_cfg, same_bits
from torch import nn

import nwave_param as nwp
from nwave_param import functional
from nwave_param._engine import hardening, plans

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
KINDS = ["linear", "conv", "convT", "lstm", "gru", "rnn", "lstmcell", "grucell", "rnncell", "large"]


@st.composite
def layers(draw):
    """A layer of a random kind and size: plain, grouped, depthwise and transposed convolutions in
    1-3d, recurrent layers whose hidden size is or is not a multiple of 5, and a Linear past the
    CPU's large-weight threshold, whose blocks are hardened in chunks and whose short last block
    goes to a pack."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "linear":
        return nn.Linear(draw(st.integers(1, 9)), draw(st.integers(1, 17)))
    if kind in ("conv", "convT"):
        cfg = conv_cfg(draw, draw(st.integers(1, 3)), kind == "convT")
        dims = len(cfg.pop("kernel_size"))
        cls = {("conv", 1): nn.Conv1d, ("conv", 2): nn.Conv2d, ("conv", 3): nn.Conv3d,
               ("convT", 1): nn.ConvTranspose1d, ("convT", 2): nn.ConvTranspose2d, ("convT", 3): nn.ConvTranspose3d}[kind, dims]
        kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        return cls(cfg["in_channels"], cfg["out_channels"], kernel, groups=cfg["groups"])
    hidden = draw(st.sampled_from([5, 10, 2, 3, 7, 9, 11]))
    inputs = draw(st.integers(1, 4))
    if kind in ("lstm", "gru", "rnn"):
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
        return cls(inputs, hidden, num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()))
    if kind in ("lstmcell", "grucell", "rnncell"):
        return {"lstmcell": nn.LSTMCell, "grucell": nn.GRUCell, "rnncell": nn.RNNCell}[kind](inputs, hidden)
    rows = draw(st.sampled_from([plans._CHUNK // 400 + 3, 2 * plans._CHUNK // 400 + 1]))  # one or two chunks, a short block
    return nn.Linear(400, rows, bias=False)


@st.composite
def memory_layouts(draw, shape):
    """How a tensor of ``shape`` lies in memory: its dims in a random order, some of them stepped
    over a larger tensor, after a storage offset; or channels_last."""
    if len(shape) in (4, 5) and draw(st.booleans()):
        return "channels_last"
    order = draw(st.permutations(range(len(shape))))
    steps = [draw(st.sampled_from([1, 1, 2])) for _ in shape]
    offset = draw(st.sampled_from([0, 0, 3]))
    return order, steps, offset


def laid_out(value, layout):
    """A tensor equal to ``value`` stored as ``layout`` says (a view over a storage of its own)."""
    if layout == "channels_last":
        memory_format = torch.channels_last if value.dim() == 4 else torch.channels_last_3d
        return value.clone(memory_format=memory_format)
    order, steps, offset = layout
    big = [value.shape[d] * steps[d] for d in order]
    storage = torch.full((offset + math.prod(big),), float("nan"), dtype=value.dtype)
    held = storage[offset:].view(big)[tuple(slice(None, None, steps[d]) for d in order)]
    held = held.permute([order.index(d) for d in range(value.dim())])
    assert held.shape == value.shape
    return held.copy_(value)


def seeded(layer, dtype, seed, scale):
    """``layer`` in ``dtype`` with seeded values past the limit, exact zeros and signed zeros."""
    generator = torch.Generator().manual_seed(seed)
    layer = layer.to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            value = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
            value[torch.rand(p.shape, generator=generator) < 0.2] = 0.0
            value[torch.rand(p.shape, generator=generator) < 0.1] = -0.0
            p.copy_(value)
    return layer


def restrided(layer, draw):
    """``layer`` with every weight the registry tracks stored in a random memory layout."""
    for item in nwp.trackable_weights(layer):
        value = getattr(item.module, item.tensor_name).detach()
        setattr(item.module, item.tensor_name, nn.Parameter(laid_out(value, draw(memory_layouts(tuple(value.shape))))))
    return layer


def definition(weight, layout, spec, hardness, noise=None):
    """The definition, on a contiguous copy of the weight."""
    return functional.harden(weight.detach().contiguous(), layout, spec, hardness, noise)


specs = st.builds(
    lambda limit, group_size, bits: nwp.ChipSpec(limit=limit, group_size=group_size, bits=bits),
    st.sampled_from([0.9, 1.66, 0.3]), st.integers(1, 7), st.sampled_from([None, None, 3, 5]),
)
hardnesses = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))

example = settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@example
@given(data=st.data(), layer=layers(), dtype=st.sampled_from(DTYPES), spec=specs, hardness=hardnesses,
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 2.0]), noise=st.sampled_from(["none", "given", "drawn"]))
def test_the_engine_hardens_any_memory_layout_as_the_definition(monkeypatch, data, layer, dtype, spec, hardness, seed, scale, noise):
    layer = restrided(seeded(layer, dtype, seed, scale), data.draw)
    reg = nwp.register(layer, spec)
    weights, layouts = reg.latent_weights(), reg.layouts
    generator = torch.Generator().manual_seed(seed)
    given_noise = [(torch.randn(w.shape, generator=generator, dtype=torch.float64) * 0.05).to(dtype) for w in weights]
    drawn = []
    gaussian = hardening._gaussian
    monkeypatch.setattr(hardening, "_gaussian", lambda like, std, dtype=None: drawn.append(gaussian(like, std, dtype)) or drawn[-1])
    got = hardening.harden_all(weights, layouts, spec, hardness, {"none": 0.0, "given": given_noise, "drawn": 0.05}[noise])
    if noise == "drawn":
        noises = noise_per_weight(drawn, weights, layouts, spec) if drawn else [None] * len(weights)
    else:
        noises = given_noise if noise == "given" else [None] * len(weights)
    for weight, layout, value, n in zip(weights, layouts, got, noises):
        assert same_bits(value, definition(weight, layout, spec, hardness, n))


def noise_per_weight(drawn, weights, layouts, spec):
    """The noise each weight received: one draw per pack, then one per chunk of a large weight,
    placed where the engine's plan put each piece (the plan reads pieces of a contiguous layout,
    as the noise is drawn)."""
    contiguous = [w.detach().contiguous() for w in weights]
    plan = plans.plan_for(contiguous, layouts, spec.group_size)
    result, drawn = [torch.zeros_like(w) for w in contiguous], iter(drawn)
    for pack in plan.packs:
        flat = next(drawn)
        for member, region in zip(pack.members, pack.regions(flat)):
            plans.source(result[member.index], member).copy_(region)
    for item in plan.direct:
        i = item.index
        m = layouts[i].matrix(result[i]).contiguous().clone()
        for view in item.views:
            plans.blocks(m.view(-1), view).copy_(next(drawn))
        result[i] = layouts[i].unmatrix(m, weights[i].shape)
    return result


@example
@given(data=st.data(), layer=layers(), dtype=st.sampled_from(DTYPES), spec=specs, hardness=hardnesses,
       seed=st.integers(0, 2**16), scale=st.sampled_from([0.5, 2.0]), mismatch=st.sampled_from([0.0, 0.02]))
def test_the_registry_computes_and_projects_any_memory_layout_as_the_definition(data, layer, dtype, spec, hardness, seed, scale, mismatch):
    spec = nwp.ChipSpec(limit=spec.limit, group_size=spec.group_size, bits=spec.bits, mismatch=mismatch)
    layer = restrided(seeded(layer, dtype, seed, scale), data.draw).eval()  # eval: no training noise
    reg = nwp.register(layer, spec).harden(hardness)
    latents = [w.detach().clone(memory_format=torch.preserve_format) for w in reg.latent_weights()]
    holders = [(e.module, e.tensor_name, e.constraint) for e in reg._tracked]

    with reg.cached():  # every weight of the pass hardened together
        for (module, name, _), weight, layout in zip(holders, latents, reg.layouts):
            assert same_bits(getattr(module, name), definition(weight, layout, spec, hardness))
    for (module, name, _), weight, layout in zip(holders, latents, reg.layouts):  # each one alone
        assert same_bits(getattr(module, name), definition(weight, layout, spec, hardness))
    with reg.on_chip(seed), reg.cached():  # one chip: its own mismatch sample
        for (module, name, constraint), weight, layout in zip(holders, latents, reg.layouts):
            assert same_bits(getattr(module, name), definition(weight, layout, spec, 1.0, constraint.chip_mismatch))

    magnitude, topology = reg.penalty_terms()
    count = sum(w.numel() for w in latents)
    want = functional.penalty_sums([w.contiguous() for w in latents], reg.layouts, spec, reg.power)
    tolerance = dict(rtol=1e-2, atol=1e-3) if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(magnitude, want[0] / count, **tolerance)
    torch.testing.assert_close(topology, want[1] / count, **tolerance)

    strides = [w.stride() for w in reg.latent_weights()]
    reg.project_()
    for weight, before, layout, stride in zip(reg.latent_weights(), latents, reg.layouts, strides):
        assert same_bits(weight.detach(), functional.project(before.contiguous(), layout, spec))
        assert weight.stride() == stride  # in place: the optimizer's Parameter, as it was
    assert reg.is_mappable()
    projected = [w.detach().clone() for w in reg.latent_weights()]
    reg.project_()  # a mappable weight is left bit-identical
    assert all(same_bits(w.detach(), p) for w, p in zip(reg.latent_weights(), projected))


@example
@given(data=st.data(), layer=layers(), dtype=st.sampled_from(DTYPES), spec=specs, seed=st.integers(0, 2**16))
def test_the_offline_api_projects_any_memory_layout_as_the_definition(data, layer, dtype, spec, seed):
    layer = restrided(seeded(layer, dtype, seed, 2.0), data.draw)
    state = layer.state_dict()  # the Parameters' own strides: views, transposes, offsets
    reference = nwp.register(copy.deepcopy(layer), spec)  # the names and layouts
    new, changes = nwp.project_state_dict(state, spec, model=layer)
    for name, layout in zip(reference.names, reference.layouts):
        assert same_bits(new[name], functional.project(state[name].contiguous(), layout, spec)), name
    assert nwp.check_state_dict(new, spec, model=layer).is_mappable
    assert not nwp.check_state_dict(state, spec, model=layer).is_mappable or all(c["changed"] == 0 for c in changes)


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_the_issues_grouped_conv_in_channels_last(memory_format):
    """The issue's case: a grouped Conv2d(4, 6, 3, groups=2) after model.to(channels_last)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)).to(memory_format=memory_format)
    with torch.no_grad():
        model[0].weight.mul_(5)
    reg = nwp.register(model).harden(1.0)
    latent = reg.latent_weights()[0].detach().clone()
    with reg.cached():
        assert same_bits(model[0].weight, functional.project(latent.contiguous(), reg.layouts[0], reg.spec))
    reg.project_()
    assert same_bits(reg.latent_weights()[0].detach(), functional.project(latent.contiguous(), reg.layouts[0], reg.spec))


def _latent_and_projection(reg):
    return [
        (w.detach().clone(), functional.project(w.detach().contiguous(), layout, reg.spec))
        for w, layout in zip(reg.latent_weights(), reg.layouts)
    ]


def test_the_issues_mappable_conv_transpose_in_channels_last_is_left_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 3, 3)).to(memory_format=torch.channels_last)
    reg = nwp.register(model)
    with torch.no_grad():  # a mappable weight, in channels_last
        model[0].parametrizations.weight.original.copy_(functional.project(model[0].weight.detach().contiguous(), reg.layouts[0], reg.spec))
    assert not model[0].parametrizations.weight.original.is_contiguous() and reg.is_mappable()
    before = reg.latent_weights()[0].detach().clone()
    reg.project_()
    assert same_bits(reg.latent_weights()[0].detach(), before)


@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l0"])
def test_the_issues_lstm_of_hidden_size_7_with_a_transposed_weight(name):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 7)
    value = getattr(lstm, name).detach() * 5
    setattr(lstm, name, nn.Parameter(value.t().contiguous().t()))  # the same values, stored column by column
    reg = nwp.register(lstm).harden(1.0)
    expected = _latent_and_projection(reg)
    with reg.cached():
        values = [getattr(lstm, n.split(".")[-1]) for n in reg.names]
    assert all(same_bits(v, want) for v, (_, want) in zip(values, expected))
    reg.project_()
    assert all(same_bits(w.detach(), want) for w, (_, want) in zip(reg.latent_weights(), expected))


def test_the_issues_large_transposed_linear_reads_its_short_last_block():
    torch.manual_seed(0)
    layer = nn.Linear(3000, 3001, bias=False)
    layer.weight = nn.Parameter((torch.randn(3000, 3001) * 2).t())  # 3001 rows: the last, short block goes to a pack
    reg = nwp.register(layer).harden(1.0)
    ((_, want),) = _latent_and_projection(reg)
    with reg.cached():
        assert same_bits(layer.weight, want)
    reg.project_()
    assert same_bits(reg.latent_weights()[0].detach(), want)


def test_the_issues_saved_channels_last_grouped_conv_projects_right_from_python_and_the_command_line(tmp_path):
    from nwave_param.checkpoints import cli

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)).to(memory_format=torch.channels_last)
    with torch.no_grad():
        model[0].weight.mul_(5)
    reg = nwp.register(model)
    ((_, want),) = _latent_and_projection(reg)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    key = "0.parametrizations.weight.original"
    assert not state[key].is_contiguous()  # saved as it was held
    new, _ = nwp.project_state_dict(state, reg.spec)
    assert same_bits(new[key], want)
    assert cli.main(["project", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.pt")]) == 0
    assert same_bits(torch.load(tmp_path / "out.pt", weights_only=True)[key], want)


def test_the_issues_plain_state_dict_of_transposed_views():
    torch.manual_seed(0)
    state = {
        "lstm.weight_ih_l0": (torch.randn(8, 28) * 2).t(),  # 4 gates of 7
        "lstm.weight_hh_l0": (torch.randn(7, 28) * 2).t(),
        "gru.weight_ih_l0": (torch.randn(3, 21) * 2).t(),
        "gru.weight_hh_l0": (torch.randn(7, 21) * 2).t(),
        "fc.weight": (torch.randn(9, 12) * 2).t(),
    }
    layouts = {"lstm": nwp.Layout(gates=4), "gru": nwp.Layout(gates=3), "fc": nwp.Layout()}
    new, _ = nwp.project_state_dict(state, nwp.H1V1)
    for key, value in state.items():
        assert same_bits(new[key], functional.project(value.contiguous(), layouts[key.split(".")[0]], nwp.H1V1)), key
    assert nwp.check_state_dict(new, nwp.H1V1).is_mappable
