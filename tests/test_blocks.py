"""The chip's building blocks: the front end's one-to-one synapses and the chip's neurons (specs
derived from the presets: test_spec.py)."""

import inspect
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from installs import not_installed
from layers import same_bits
from torch import nn

import nwave_param as nwp
from nwave_param import blocks, functional

snn = pytest.importorskip("snntorch", reason=not_installed("snntorch"))


# --- FrontEnd -----------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(channels=st.integers(1, 16), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_a_front_end_multiplies_each_channel_by_its_own_gain(channels, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    front = nwp.FrontEnd(channels)
    with torch.no_grad():
        front.weight.copy_(torch.randn(channels, 1, 1, generator=generator))
    x = torch.randn(3, batch, channels, generator=generator)
    torch.testing.assert_close(front(x), x * front.weight.view(-1), rtol=0, atol=0)


def test_a_registered_front_end_has_one_synapse_per_channel_everywhere():
    torch.manual_seed(0)
    model = nn.Sequential(
        nwp.FrontEnd(12, gain=3.0), nwp.ChipLeaky(0.9, init_hidden=True), nn.Linear(12, 20), nwp.ChipLeaky(0.9, init_hidden=True)
    )
    spec = nwp.H1V2.replace(bits=5, mismatch=0.1)
    reg = nwp.register(model, spec)
    assert reg.names == ["0.weight", "2.weight"] and reg.layouts[0] == nwp.Layout(groups=12)
    assert model[0].parametrizations.weight.original.shape == (12, 1, 1)  # the documented key and shape
    assert reg.report()[0].block_columns == 12 * 3  # 12 inputs, each its own column of one synapse, in 3 blocks
    with torch.no_grad():
        model[0].parametrizations.weight.original.copy_(torch.linspace(-3, 3, 12).view(12, 1, 1))
    assert reg.report()[0].topology == 0  # one synapse per column: no sign to share
    reg.project_()
    gains = model[0].parametrizations.weight.original.view(-1)
    want = functional.round_to_grid(torch.linspace(-3, 3, 12).clamp(-1.66, 1.66), spec)
    assert same_bits(gains, want)  # each gain on its own: clamped and on the grid
    placement = nwp.place(model, torch.rand(4, 12), spec)
    assert placement.fits and placement.populations[0].front_end, placement.problems


def test_on_a_chip_mismatch_reaches_every_synapse_that_exists_and_none_that_does_not():
    """A front end of one gain per channel gets one mismatch sample per gain; a Linear's zero is a
    synapse (merely zero), and gets its sample too."""
    torch.manual_seed(0)
    front, linear = nwp.FrontEnd(6), nn.Linear(6, 5, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
    model = nn.Sequential(front, linear)
    reg = nwp.register(model, nwp.H1V2.replace(mismatch=0.05))
    x = torch.eye(6)  # one channel at a time: the front end's dense matrix, column by column
    with reg.on_chip(3), torch.no_grad():
        dense = torch.stack([front(row) for row in x], 1)  # dense[i, j]: channel j's effect on neuron i
        noisy = linear.weight.clone()
    assert torch.count_nonzero(dense - torch.diag(torch.diagonal(dense))) == 0  # off the diagonal: absent, on any chip
    assert not torch.equal(torch.diagonal(dense), torch.ones(6))  # the gains themselves vary
    assert torch.count_nonzero(noisy) == noisy.numel()  # every zero of the Linear is a synapse: perturbed


def test_a_dense_front_end_trained_away_from_one_to_one_is_refused_where_a_front_end_is_not():
    """The README's old front end, nn.Linear(16, 16) started at the identity, stops being one-to-one
    once trained; FrontEnd cannot."""
    torch.manual_seed(0)
    for front, fits in ((nn.Linear(16, 16, bias=False), False), (nwp.FrontEnd(16), True)):
        model = nn.Sequential(front, nwp.ChipLeaky(0.9, init_hidden=True), nn.Linear(16, 10), nwp.ChipLeaky(0.9, init_hidden=True))
        if isinstance(front, nn.Linear):
            nn.init.eye_(front.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):  # a few steps of training
            out = model(torch.rand(8, 16)).sum()
            optimizer.zero_grad()
            out.backward()
            optimizer.step()
            for m in model:
                if hasattr(m, "reset_mem"):
                    m.reset_mem()
        assert nwp.place(model, torch.rand(4, 16), nwp.H1V2).fits is fits


def test_front_end_arguments_are_checked():
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="FrontEnd: channels must be a positive int"):
            nwp.FrontEnd(bad)
    with pytest.raises(ValueError, match="FrontEnd: gain must be a finite number"):
        nwp.FrontEnd(4, gain=float("nan"))


@settings(max_examples=30, deadline=None)
@given(channels=st.integers(1, 16), shape=st.lists(st.integers(1, 33), min_size=0, max_size=3))
def test_a_front_end_refuses_an_input_whose_last_dim_is_not_its_channels(channels, shape):
    """Channels first, ``(batch, 16, time)``, would otherwise take each gain by flat position."""
    front = nwp.FrontEnd(channels)
    x = torch.ones(shape)
    if shape and shape[-1] == channels:
        assert torch.equal(front(x), x)
    else:
        said = re.escape(f"FrontEnd: expected an input of shape (..., {channels}), its last dim the channels, got {list(shape)}")
        with pytest.raises(ValueError, match=said):
            front(x)



@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 3), (2, 4, 3, 5)], ids=["(channels, batch)", "(batch, channels, time)", "NCHW"])
def test_a_front_end_refusal_hint_moves_the_channels_last(shape):
    """The refusal's example, run on the input it refused, gives one the front end takes."""
    front, x = nwp.FrontEnd(4), torch.rand(shape)
    with pytest.raises(ValueError) as refused:
        front(x)
    hinted = eval(re.search(r"\(e\.g\. (.*)\)$", str(refused.value))[1], {"x": x})
    assert torch.equal(front(hinted), hinted)


@pytest.mark.parametrize("compile_", [torch.fx.symbolic_trace, torch.jit.script], ids=["fx", "torchscript"])
def test_a_front_end_traces_and_scripts_and_still_refuses_channels_first(compile_):
    """torch.fx's proxies have no shape (the check is a leaf of the traced graph, run at each
    call), and TorchScript takes a subset of Python: both keep the check."""
    front = nwp.FrontEnd(4, gain=2.0)
    compiled = compile_(front)
    x = torch.rand(3, 4)
    assert torch.equal(compiled(x), front(x))
    said = re.escape("FrontEnd: expected an input of shape (..., 4), its last dim the channels, got [3, 4, 5]")
    with pytest.raises(Exception, match=said):  # TorchScript raises its own error, holding the ValueError's text
        compiled(torch.rand(3, 4, 5))

# --- the chip's neurons -------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), recurrent=st.booleans(), steps=st.integers(1, 6))
def test_chip_neurons_are_snntorchs_where_the_membrane_stays_positive_and_clamped_where_it_would_not(seed, recurrent, steps):
    generator = torch.Generator().manual_seed(seed)
    make = (lambda cls: cls(0.8, linear_features=5)) if recurrent else (lambda cls: cls(0.8))
    torch.manual_seed(seed)
    chip = make(nwp.ChipRLeaky if recurrent else nwp.ChipLeaky)
    torch.manual_seed(seed)
    reference = make(snn.RLeaky if recurrent else snn.Leaky)
    reference.reset_mechanism = "subtract"
    inputs = [torch.randn(3, 5, generator=generator) * 2 for _ in range(steps)]

    def run(neuron, clamp):
        state = neuron.init_rleaky() if recurrent else (neuron.init_leaky(),)
        out = []
        for x in inputs:
            *spikes, mem = neuron(x, *state)
            if clamp:
                mem = mem.clamp(min=0)  # the chip's rule, written out: never below zero, after each update
            state = (*spikes, mem) if recurrent else (mem,)
            out.append((spikes[0], mem))
        return out

    for (spikes, mem), (want_spikes, want_mem) in zip(run(chip, False), run(reference, True)):
        assert torch.equal(spikes, want_spikes) and torch.equal(mem, want_mem) and bool((mem >= 0).all())
    inputs[:] = [x.abs() for x in inputs]  # with only positive input the membrane never goes below zero: snnTorch's own
    with torch.no_grad():
        for p in [*chip.parameters(), *reference.parameters()]:
            p.abs_()  # and positive recurrent synapses
    for (spikes, mem), (want_spikes, want_mem) in zip(run(chip, False), run(reference, False)):
        assert torch.equal(spikes, want_spikes) and torch.equal(mem, want_mem)


def test_chip_neurons_share_one_threshold_and_reset_by_subtraction():
    neurons = [nwp.ChipLeaky(0.9), nwp.ChipRLeaky(0.7, linear_features=4)]
    assert all(float(n.threshold) == 1.0 and n.reset_mechanism == "subtract" for n in neurons)
    assert isinstance(neurons[0], snn.Leaky) and isinstance(neurons[1], snn.RLeaky)  # drop-ins
    model = nn.Sequential(
        nwp.FrontEnd(4), nwp.ChipLeaky(0.9, init_hidden=True), nn.Linear(4, 8), nwp.ChipRLeaky(0.8, linear_features=8, init_hidden=True)
    )
    assert nwp.place(model, torch.rand(3, 4), nwp.H1V2).fits
    on_h1v1 = nwp.place(model, torch.rand(3, 4), nwp.H1V1)
    assert not on_h1v1.fits and all("resets by subtracting" in p for p in on_h1v1.problems)


@pytest.mark.parametrize(
    "name, args, kwargs",
    [
        ("Leaky", (0.9, 0.5), {}),  # beta, threshold
        ("Leaky", (0.9,), {"threshold": 0.3, "reset_mechanism": "zero", "learn_beta": True}),
        ("RLeaky", (0.9, 0.5, True, 4), {}),  # beta, V, all_to_all, linear_features
        ("RLeaky", (0.8,), {"linear_features": 3, "threshold": 0.7}),
    ],
)
def test_chip_neurons_take_snntorchs_arguments_as_snntorch_does(name, args, kwargs):
    torch.manual_seed(0)
    chip = getattr(nwp, f"Chip{name}")(*args, **kwargs)
    torch.manual_seed(0)
    reference = getattr(snn, name)(*args, **kwargs)
    assert isinstance(chip, type(reference))
    for attribute in ("threshold", "beta", "reset_mechanism", "all_to_all", "linear_features", "V"):
        if hasattr(reference, attribute):
            want, got = getattr(reference, attribute), getattr(chip, attribute)
            assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want, attribute
    assert {k: v.shape for k, v in chip.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_chip_neurons_refuse_arguments_snntorch_does_not_take_and_an_unconstrained_recurrent_weight_by_name():
    with pytest.raises(TypeError, match="ChipLeaky: .*bogus.*snntorch.Leaky"):
        nwp.ChipLeaky(0.9, bogus=1)
    with pytest.raises(TypeError, match="ChipRLeaky: .*threshold"):
        nwp.ChipRLeaky(0.9, 1.0, True, 4, 8, 3, 0.5, threshold=0.5)  # threshold twice
    for refused in (lambda: nwp.ChipRLeaky(0.9, 1.0, False, 4), lambda: nwp.ChipRLeaky(0.9, all_to_all=False, linear_features=4)):
        with pytest.raises(ValueError, match="ChipRLeaky: all_to_all=False keeps one recurrent weight per neuron"):
            refused()
    with pytest.raises(ValueError, match="ChipRLeaky: conv2d_channels makes the recurrence a convolution.*use linear_features"):
        nwp.ChipRLeaky(0.9, conv2d_channels=2, kernel_size=3)


@pytest.mark.parametrize("register", [lambda m: nwp.register(m), lambda m: nwp.register(m, example=torch.rand(3, 4))])
def test_registering_snntorchs_one_to_one_recurrence_warns_that_its_weights_go_unchecked(register):
    """snnTorch's ``RLeaky(all_to_all=False)`` keeps one recurrent weight per neuron in ``V``: a
    synapse nwave_param does not track, said by name rather than passed as checked."""
    model = nn.Sequential(nn.Linear(4, 6), snn.RLeaky(0.9, V=torch.full((6,), 3.0), all_to_all=False, init_hidden=True))
    said = r"^1\.V holds one-to-one recurrent synapses \(all_to_all=False\), which nwave_param does not track"
    with pytest.warns(UserWarning, match=said):
        register(model)


def test_the_chip_neurons_are_snntorchs_classes_and_snntorch_stays_optional():
    assert issubclass(nwp.ChipLeaky, snn.Leaky) and issubclass(nwp.ChipRLeaky, snn.RLeaky)

    class Mine(nwp.ChipLeaky):  # a user's own neuron on top
        def __init__(self):
            super().__init__(0.8, 0.5)

    mine = Mine()
    assert isinstance(mine, nwp.ChipLeaky) and float(mine.threshold) == 0.5 and mine.reset_mechanism == "subtract"
    assert {"ChipLeaky", "ChipRLeaky"} <= set(dir(blocks)) and inspect.signature(nwp.ChipRLeaky) == inspect.signature(snn.RLeaky)
    without = (  # snnTorch absent: the names are there, every import and introspection works, constructing one says what to install
        "import inspect, sys; sys.modules['snntorch'] = None\n"
        "import nwave_param as nwp, nwave_param.demo, nwave_param.blocks\n"
        "from nwave_param import *\n"
        "from nwave_param.blocks import *\n"
        "inspect.getmembers(nwp); inspect.getmembers(nwave_param.blocks)\n"
        "nwp.FrontEnd(3)\n"
        "assert hasattr(nwp, 'ChipLeaky') and hasattr(nwave_param.blocks, 'ChipRLeaky')\n"
        "for neuron in (nwp.ChipLeaky, nwp.ChipRLeaky):\n"
        "    try:\n        neuron(0.9)\n    except ImportError as error:\n        print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", without], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == 2 * "the chip neurons are snnTorch neurons: pip install snntorch\n", done.stderr
