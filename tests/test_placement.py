"""nwp.place: the network's populations on the chip's cores, or the rules it breaks, one line each."""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from installs import not_installed

import nwave_param as nwp
from nwave_param.placement import pack

snn = pytest.importorskip("snntorch", reason=not_installed("snntorch"))


def feasible(sizes, cores):
    """Brute force: some core for each size, no core over its capacity."""
    return any(
        all(sum(s for s, c in zip(sizes, where) if c == core) <= cap for core, cap in enumerate(cores))
        for where in itertools.product(range(len(cores)), repeat=len(sizes))
    )


@settings(max_examples=300)
@given(sizes=st.lists(st.integers(1, 40), max_size=6), cores=st.lists(st.integers(1, 60), min_size=1, max_size=4))
def test_pack_finds_an_assignment_exactly_when_one_exists(sizes, cores):
    where = pack(sizes, cores)
    assert (where is not None) == feasible(sizes, cores)
    if where is not None:
        assert all(sum(s for s, c in zip(sizes, where) if c == core) <= cap for core, cap in enumerate(cores))


class Neurons(nn.Module):
    """A population named through ``neurons=``: spikes where the input is positive; recurrent
    when it holds a square weight of its size."""

    def __init__(self, size, recurrent):
        super().__init__()
        self.recurrent_weights = nn.Parameter(torch.zeros(size, size)) if recurrent else None

    def forward(self, x):
        return (x > 0).float()


def chain(sizes, recurrent):
    """gain (diagonal) -> Neurons -> Linear -> Neurons -> ..., populations named p0, p1, ..."""
    layers = nn.Sequential()
    layers.add_module("gain", nn.Linear(sizes[0], sizes[0], bias=False))
    with torch.no_grad():
        layers.gain.weight.copy_(torch.eye(sizes[0]))
    for i, (size, rec) in enumerate(zip(sizes, recurrent)):
        if i:
            layers.add_module(f"fc{i}", nn.Linear(sizes[i - 1], size))
        layers.add_module(f"p{i}", Neurons(size, rec))
    return layers, [f"p{i}" for i in range(len(sizes))]


@settings(max_examples=200)
@given(
    populations=st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=6),
    cores=st.lists(st.integers(1, 60), min_size=1, max_size=4),
)
def test_place_fits_exactly_when_the_populations_can_be_placed_and_places_them_by_the_rules(populations, cores):
    sizes, recurrent = [s for s, _ in populations], [r for _, r in populations]
    model, names = chain(sizes, recurrent)
    spec = nwp.ChipSpec(cores=tuple(cores), inputs=64)
    placement = nwp.place(model, torch.randn(2, sizes[0]), spec, neurons=names)
    assert [(p.name, p.neurons, p.recurrent, p.front_end) for p in placement.populations] == [
        (n, s, r, i == 0) for i, (n, s, r) in enumerate(zip(names, sizes, recurrent))
    ]
    expected = sum(sizes) <= sum(cores) and feasible([s for s, r in zip(sizes, recurrent) if r], cores)
    assert placement.fits == expected and placement.fits == (not placement.problems)
    if not placement.fits:
        assert all(not p.cores for p in placement.populations)
        return
    for p in placement.populations:
        assert sum(p.cores.values()) == p.neurons and all(n > 0 for n in p.cores.values())
        assert not p.recurrent or len(p.cores) == 1  # a recurrent population sits whole in one core
    for core, capacity in enumerate(cores):
        assert sum(p.cores.get(core, 0) for p in placement.populations) <= capacity


def snn_net(inputs=8, front=8, hidden=40, outputs=10, dense_input=False):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Linear(inputs, front, bias=False)
            self.front = snn.Leaky(beta=0.9, init_hidden=True)
            self.fc = nn.Linear(front, hidden)
            self.hidden = snn.RLeaky(beta=0.9, linear_features=hidden, init_hidden=True)
            self.readout = nn.Linear(hidden, outputs)
            self.out = snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):
            return self.out(self.readout(self.hidden(self.fc(self.front(self.gain(x))))))

    net = Net()
    if not dense_input:
        with torch.no_grad():
            net.gain.weight.copy_(torch.eye(front, inputs) * 2)
    return net


def test_a_network_for_h1v2_is_placed_with_its_recurrent_population_whole():
    placement = nwp.place(snn_net(hidden=100, outputs=50), torch.rand(4, 8), nwp.H1V2)
    assert placement.fits and placement.problems == []
    front, hidden, out = placement.populations
    assert (front.name, front.neurons, front.front_end, front.recurrent) == ("front", 8, True, False)
    assert (hidden.name, hidden.neurons, hidden.recurrent, hidden.cores) == ("hidden", 100, True, {2: 100})
    assert (out.neurons, out.recurrent) == (50, False) and sum(out.cores.values()) == 50
    assert json.loads(json.dumps(placement.to_dict())) == placement.to_dict()
    assert placement.to_dict()["populations"][1]["cores"] == {"2": 100}
    text = str(placement)
    assert text.splitlines()[0] == "cores (50, 50, 100), 16 inputs: fits" and "hidden" in text and "core 2: 100" in text


@pytest.mark.parametrize(
    "kwargs, example, spec, expected",
    [
        ({"hidden": 100}, (4, 8), nwp.H1V1, r"^hidden: a recurrent population of 100 neurons sits whole in one core, and the largest core holds 64$"),
        ({"hidden": 60, "outputs": 150}, (4, 8), nwp.H1V2, r"^the network has 218 neurons; the chip holds 200 \(50 \+ 50 \+ 100\)$"),
        ({"inputs": 20, "front": 20}, (4, 20), nwp.H1V2, r"^the example has 20 input channels \(its last dimension\); the chip's front end has 16$"),
        ({"inputs": 8, "front": 20}, (4, 8), nwp.H1V2, r"^front: the front end has 20 neurons; the chip feeds its 16 input channels one-to-one"),
        ({"dense_input": True}, (4, 8), nwp.H1V2, r"^gain.weight: a weight applied before the front end \(front\) has up to 8 non-zero entries per output neuron.*one-to-one"),
    ],
)
def test_each_broken_rule_is_one_line_naming_the_population_and_its_numbers(kwargs, example, spec, expected):
    placement = nwp.place(snn_net(**kwargs), torch.rand(*example), spec)
    assert not placement.fits and any(__import__("re").search(expected, line) for line in placement.problems), placement.problems
    assert all("\n" not in line for line in placement.problems)
    assert all(not p.cores for p in placement.populations)


def test_recurrent_populations_that_each_fit_a_core_but_not_together_are_named():
    model, names = chain([8, 60, 60], [False, True, True])
    placement = nwp.place(model, torch.randn(2, 8), nwp.H1V2, neurons=names)
    assert placement.problems == [
        "the recurrent populations p1 (60), p2 (60) each sit whole in one core, and no assignment fits them in cores (50, 50, 100)"
    ]


def test_norse_recurrent_lif_is_a_recurrent_population():
    norse = pytest.importorskip("norse.torch", reason=not_installed("norse"))
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Linear(4, 4, bias=False)
            self.hidden = norse.LIFRecurrent(4, 30)
            self.out = norse.LIF()

        def forward(self, x):  # x: (time, batch, 4)
            spikes, _ = self.hidden(self.gain(x))
            return self.out(spikes)[0]

    model = Net()
    with torch.no_grad():
        model.gain.weight.copy_(torch.eye(4))
    placement = nwp.place(model, torch.rand(5, 2, 4), nwp.H1V1)
    assert [(p.name, p.neurons, p.recurrent, p.front_end) for p in placement.populations] == [
        ("hidden", 30, True, True), ("out", 30, False, False)
    ]
    assert not placement.fits and "front end has 30 neurons" in placement.problems[0]


def test_without_neuron_modules_it_says_how_to_name_them():
    placement = nwp.place(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.rand(2, 4))
    assert not placement.fits and placement.populations == []
    assert len(placement.problems) == 1 and "neurons=(" in placement.problems[0]
    named = nwp.place(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.rand(2, 4), neurons=["1"])
    assert [p.name for p in named.populations] == ["1"]


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((nn.Linear(2, 2), [1.0]), {}, TypeError, "example must be a tensor"),
        ((nn.Linear(2, 2), torch.rand(2)), {"spec": 0.9}, TypeError, "spec must be a ChipSpec"),
        ((nn.Linear(2, 2), torch.rand(2)), {"neurons": ["lif"]}, ValueError, "neurons names 'lif'"),
        (("model", torch.rand(2)), {}, TypeError, "model must be an nn.Module"),
    ],
)
def test_bad_arguments_are_refused_naming_them(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        nwp.place(*args, **kwargs)


def test_the_model_is_exactly_as_before_and_the_spec_defaults_to_its_registration():
    torch.manual_seed(0)
    model = snn_net(hidden=60, outputs=50)
    reg = nwp.register(model, nwp.H1V2).harden(0.5)
    model.train()
    model.out.eval()
    hook = model.fc.register_forward_hook(lambda *args: None)
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    placement = nwp.place(model, torch.rand(4, 8))
    assert placement.spec == nwp.H1V2 and placement.fits
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # snnTorch's mem, spk, ...
    assert [m.training for m in model.modules()] == modes
    assert [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert all(p.grad is None for p in model.parameters()) and reg.hardness == 0.5
    hook.remove()


def test_a_square_weight_of_any_name_makes_a_named_population_recurrent_and_leaky_integrators_are_not_neurons():
    norse = pytest.importorskip("norse.torch", reason=not_installed("norse"))

    class Recurrent(nn.Module):  # the user's own neurons, connected through a weight named W
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(30, 30))

        def forward(self, x):
            return (x + x @ self.W > 1).float()

    model = nn.Sequential(snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(16, 30), Recurrent(), nn.Linear(30, 10), norse.LICell())
    placement = nwp.place(model, torch.rand(4, 16), nwp.H1V2, neurons="2")
    assert [(p.name, p.neurons, p.recurrent) for p in placement.populations] == [("0", 16, False), ("2", 30, True)]


def test_a_graph_built_before_placing_still_backpropagates():
    torch.manual_seed(0)
    model = snn_net(hidden=60, outputs=50)
    loss = model(torch.rand(4, 8)).sum() + sum((p**2).sum() for p in model.parameters())
    versions = {k: v._version for k, v in model.state_dict(keep_vars=True).items()}
    nwp.place(model, torch.rand(4, 8), nwp.H1V2)
    assert {k: v._version for k, v in model.state_dict(keep_vars=True).items()} == versions  # nothing written back needlessly
    loss.backward()  # would fail had place written any tensor the graph saved
    assert all(p.grad is not None for p in model.parameters())


def test_a_neuron_module_inside_a_named_one_is_part_of_that_population():
    class Block(nn.Module):  # a layer of the user's: its own synapses and snnTorch's neurons
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 12)
            self.lif = snn.Leaky(beta=0.9, init_hidden=True)

        def forward(self, x):
            return self.lif(self.fc(x))

    model = nn.Sequential(nn.Identity(), Block(), snn.Leaky(beta=0.9, init_hidden=True))
    placement = nwp.place(model, torch.rand(2, 8), nwp.H1V2, neurons=["1"])
    assert [(p.name, p.neurons, p.front_end) for p in placement.populations] == [("1", 12, True), ("2", 12, False)]
