"""nwp.place: the network read from what it computes, placed on the chip's cores in blocks, or the
rules it breaks, one line each."""

import json
import math
import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from installs import not_installed
from layers import assert_same_snapshot, snapshot
from torch import nn

import nwave_param as nwp

snn = pytest.importorskip("snntorch", reason=not_installed("snntorch"))

SUBTRACT = dict(beta=0.9, reset_mechanism="subtract")
H1V2 = nwp.H1V2


def leaky(**kwargs):
    return snn.Leaky(**{**SUBTRACT, **kwargs})


# --- the brute-force reference: populations placed neuron slot by neuron slot -------------------


def placeable(populations, cores, g):
    """Whether ``populations`` ((neurons, recurrent) each) fit ``cores`` with every population and
    piece starting at a multiple of ``g`` in its core, every piece but a population's last holding
    a multiple of ``g`` neurons, a recurrent population in one piece: a search over slot positions."""
    used = [[False] * c for c in cores]

    def free_run(core, start, length):
        return start + length <= cores[core] and not any(used[core][start : start + length])

    def mark(core, start, length, value):
        for k in range(start, start + length):
            used[core][k] = value

    def place_population(i, left, cores_used):
        if i == len(populations):
            return True
        neurons, recurrent = populations[i]
        if left == 0:
            return place_population(i + 1, populations[i + 1][0] if i + 1 < len(populations) else 0, ())
        for core in range(len(cores)):
            if core in cores_used:
                continue
            for start in range(0, cores[core], g):
                lengths = [left] if recurrent else sorted({left, *range(g, left, g)}, reverse=True)
                for length in lengths:
                    if length != left and length % g:
                        continue
                    if free_run(core, start, length):
                        mark(core, start, length, True)
                        if place_population(i, left - length, (*cores_used, core)):
                            return True
                        mark(core, start, length, False)
        return False

    return not populations or place_population(0, populations[0][0], ())


# --- randomly wired networks, as modules and as tensor code -------------------------------------


class Wired(nn.Module):
    """Populations of snnTorch Leaky neurons wired by ``edges`` ((source, target) pairs: a
    population's spikes through a weight into another's input, or its own: recurrent), the
    input into population 0 through a diagonal gain.  ``style`` writes each weight as an
    nn.Linear, as a bare Parameter applied as ``x @ W`` (``[in, out]``), or through ``F.linear``."""

    def __init__(self, sizes, edges, style, steps=2):
        super().__init__()
        self.sizes, self.edges, self.style, self.steps = sizes, edges, style, steps
        self.gain = nn.Parameter(torch.ones(sizes[0]))
        self.neurons = nn.ModuleList(leaky() for _ in sizes)
        self.synapses = nn.ModuleList()
        self.matrices = nn.ParameterList()
        for source, target in edges:
            if style == "modules":
                self.synapses.append(nn.Linear(sizes[source], sizes[target], bias=False))
            else:
                shape = (sizes[source], sizes[target]) if style == "x @ W" else (sizes[target], sizes[source])
                self.matrices.append(nn.Parameter(torch.randn(shape)))

    def synapse(self, k, spikes):
        if self.style == "modules":
            return self.synapses[k](spikes)
        if self.style == "x @ W":
            return spikes @ self.matrices[k]
        return nn.functional.linear(spikes, self.matrices[k])

    def forward(self, x):  # x: (time, batch, sizes[0])
        batch = x.shape[1]
        spikes = [torch.zeros(batch, n) for n in self.sizes]
        mems = [lif.init_leaky() for lif in self.neurons]
        for t in range(self.steps):
            for j, lif in enumerate(self.neurons):
                current = x[t] * self.gain if j == 0 else torch.zeros(batch, self.sizes[j])
                for k, (source, target) in enumerate(self.edges):
                    if target == j:
                        current = current + self.synapse(k, spikes[source])
                spikes[j], mems[j] = lif(current, mems[j])
        return spikes[-1]


@st.composite
def wirings(draw):
    count = draw(st.integers(1, 4))
    sizes = [draw(st.integers(1, 16))] + [draw(st.integers(1, 30)) for _ in range(count - 1)]
    edges = [(j - 1, j) for j in range(1, count)]  # a chain from the input
    edges += [(j, j) for j in range(count) if draw(st.booleans())]  # recurrent ones
    if count > 2 and draw(st.booleans()):
        edges.append((count - 1, 1))  # a cycle through other populations
    return sizes, edges


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    wiring=wirings(),
    style=st.sampled_from(["modules", "x @ W", "F.linear"]),
    cores=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    group_size=st.sampled_from([1, 2, 3, 5]),
)
def test_randomly_wired_networks_are_read_and_placed_as_a_brute_force_reference_says(wiring, style, cores, group_size):
    sizes, edges = wiring
    torch.manual_seed(0)
    model = Wired(sizes, edges, style)
    spec = nwp.ChipSpec(cores=tuple(cores), inputs=64, group_size=group_size, reset="subtract")
    placement = nwp.place(model, torch.rand(2, 3, sizes[0]), spec)
    recurrent = [(j, j) in edges for j in range(len(sizes))]
    assert [(p.name, p.neurons, p.recurrent, p.front_end) for p in placement.populations] == [
        (f"neurons.{j}", n, r, j == 0) for j, (n, r) in enumerate(zip(sizes, recurrent))
    ]
    looped = any(target < source for source, target in edges if source != target)
    assert any("cycle" in note for note in placement.notes) == looped
    assert placement.fits == placeable(list(zip(sizes, recurrent)), cores, group_size)
    if placement.fits:
        assert_placed_in_blocks(placement, cores, group_size)


def assert_placed_in_blocks(placement, cores, g):
    taken = [set() for _ in cores]
    for p in placement.populations:
        assert sum(p.cores.values()) == p.neurons and set(p.cores) == set(p.offsets)
        assert not p.recurrent or len(p.cores) == 1  # a recurrent population sits whole in one core
        pieces = list(p.cores.items())
        for k, (core, neurons) in enumerate(pieces):
            first = p.offsets[core]
            assert first % g == 0 and first + neurons <= cores[core]  # starts at a block, inside its core
            assert k == len(pieces) - 1 or neurons % g == 0  # no block cut but the population's last
            slots = set(range(first, first + neurons))
            assert not slots & taken[core]
            taken[core] |= set(range(first, first + -(-neurons // g) * g))  # the padding is taken too


# --- the networks -----------------------------------------------------------------------


class RecurrentInForward(nn.Module):
    """A Leaky and a Linear(120, 120) feeding its spikes back, written in the parent's forward."""

    def __init__(self, hidden=120):
        super().__init__()
        self.front, self.encode, self.lif, self.feedback = leaky(), nn.Linear(16, hidden), leaky(), nn.Linear(hidden, hidden)
        self.hidden = hidden

    def forward(self, x):
        front, mem = self.front.init_leaky(), self.lif.init_leaky()
        spikes = torch.zeros(x.shape[1], self.hidden)
        for x_t in x:
            front_spikes, front = self.front(x_t, front)
            spikes, mem = self.lif(self.encode(front_spikes) + self.feedback(spikes), mem)
        return spikes


class OneLeakyTwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.front, self.lif = leaky(), leaky()
        self.first, self.second = nn.Linear(16, 120), nn.Linear(120, 120)

    def forward(self, x):
        front, first, second = self.front.init_leaky(), self.lif.init_leaky(), self.lif.init_leaky()
        for x_t in x:
            front_spikes, front = self.front(x_t, front)
            spikes, first = self.lif(self.first(front_spikes), first)
            out, second = self.lif(self.second(spikes), second)
        return out


class SpikingLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.front, self.encode = leaky(init_hidden=True), nn.Linear(16, 120)
        self.lstm = snn.SLSTM(120, 120, init_hidden=True, reset_mechanism="subtract")

    def forward(self, x):
        for x_t in x:
            out = self.lstm(self.encode(self.front(x_t)))
        return out


class ConvIntoLeaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))
        self.front = leaky(init_hidden=True)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.lif = leaky(init_hidden=True)

    def forward(self, x):  # (batch, 1, 14, 14)
        return self.lif(self.conv(self.front(x * self.gain)))


def test_recurrence_written_in_the_forward_is_recurrent():
    placement = nwp.place(RecurrentInForward(), torch.rand(5, 2, 16), H1V2)
    assert [(p.name, p.recurrent) for p in placement.populations] == [("front", False), ("lif", True)]
    assert placement.problems == ["lif: a recurrent population of 120 neurons sits whole in one core, and the largest core holds 100"]
    fitting = nwp.place(RecurrentInForward(hidden=100), torch.rand(5, 2, 16), H1V2)
    assert fitting.fits and fitting.populations[1].cores == {2: 100}


def test_an_snntorch_slstm_is_recurrent_through_its_cell():
    placement = nwp.place(SpikingLSTM(), torch.rand(5, 2, 16), H1V2)
    assert [(p.name, p.neurons, p.recurrent) for p in placement.populations] == [("front", 16, False), ("lstm", 120, True)]
    assert not placement.fits


def test_one_leaky_applied_to_two_layers_makes_two_populations():
    placement = nwp.place(OneLeakyTwoLayers(), torch.rand(5, 2, 16), H1V2)
    assert [(p.name, p.neurons) for p in placement.populations] == [("front", 16), ("lif[0]", 120), ("lif[1]", 120)]
    assert placement.problems == ["the network has 256 neurons; the chip holds 200 (50 + 50 + 100)"]


def test_a_convolution_into_a_leaky_counts_every_neuron_of_its_feature_map():
    placement = nwp.place(ConvIntoLeaky(), torch.rand(2, 1, 14, 14), H1V2, dims="bccc")
    assert [(p.name, p.neurons) for p in placement.populations] == [("front", 196), ("lif", 8 * 14 * 14)]
    one = nwp.place(ConvIntoLeaky(), torch.rand(1, 1, 14, 14), H1V2, dims="bccc")  # a batch of 1 too
    assert [p.neurons for p in one.populations] == [196, 1568]


class DenseFrontEnd(nn.Module):
    """A dense 16 x 16 matrix between the input and the front end, written in one of the issue's ways."""

    def __init__(self, way):
        super().__init__()
        self.way = way
        dense = torch.randn(16, 16)
        if way == "x @ W.T":
            self.front_weight = nn.Parameter(dense)
        elif way == "F.linear(x, gain.weight)":
            self.gain = nn.Linear(16, 16, bias=False)
        elif way == "a Parameter named kernel":
            self.kernel = nn.Parameter(dense)
        self.front, self.encode, self.out = leaky(init_hidden=True), nn.Linear(16, 20), leaky(init_hidden=True)

    def forward(self, x):
        if self.way == "x @ W.T":
            x = x @ self.front_weight.T
        elif self.way == "F.linear(x, gain.weight)":
            x = nn.functional.linear(x, self.gain.weight)
        else:
            x = x @ self.kernel
        return self.out(self.encode(self.front(x)))


@pytest.mark.parametrize("way", ["x @ W.T", "F.linear(x, gain.weight)", "a Parameter named kernel"])
def test_a_dense_matrix_before_the_front_end_is_refused_however_it_is_written(way):
    placement = nwp.place(DenseFrontEnd(way), torch.rand(4, 16), H1V2)
    assert not placement.fits
    said = r"^front: one of its neurons gets up to 16 input channels, and one channel reaches up to 16 .* no fan-in or fan-out"
    assert any(re.search(said, line) for line in placement.problems)


def test_a_gain_matrix_with_fan_out_is_refused():
    model = DenseFrontEnd("F.linear(x, gain.weight)")
    with torch.no_grad():
        model.gain.weight.copy_(torch.eye(16))
        model.gain.weight[:, 0] = 1.0  # channel 0 reaches all 16 front-end neurons
    placement = nwp.place(model, torch.rand(4, 16), H1V2)
    assert placement.problems == [
        "front: one of its neurons gets up to 2 input channels, and one channel reaches up to 16 of its neurons (through "
        "F.linear(x, weight) in the model); the chip's input channels reach the front end one-to-one, with no fan-in or "
        "fan-out (nwp.FrontEnd, a gain per channel, or a diagonal matrix)"
    ]
    with torch.no_grad():
        model.gain.weight.copy_(torch.eye(16))
    assert nwp.place(model, torch.rand(4, 16), H1V2).fits


class FrontModule(nn.Module):
    """A front end named with ``neurons=``, holding a dense Linear and a Leaky."""

    def __init__(self):
        super().__init__()
        self.mix, self.lif = nn.Linear(16, 16, bias=False), leaky(init_hidden=True)

    def forward(self, x):
        return self.lif(self.mix(x))


def test_a_dense_linear_inside_a_named_front_end_is_refused():
    model = nn.Sequential(FrontModule(), nn.Linear(16, 20), leaky(init_hidden=True))
    placement = nwp.place(model, torch.rand(4, 16), H1V2, neurons=["0"])
    assert placement.populations[0].name == "0" and placement.populations[0].front_end
    assert any(
        line.startswith(
            "0: one of its neurons gets up to 16 input channels, and one channel reaches up to 16 of its neurons (through "
            "F.linear(x, weight) in 0.mix)"
        )
        for line in placement.problems
    )


def test_a_named_module_wrapping_a_feed_forward_square_linear_is_not_recurrent():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif = nn.Linear(120, 120), leaky(init_hidden=True)

        def forward(self, x):
            return self.lif(self.fc(x))

    model = nn.Sequential(leaky(init_hidden=True), nn.Linear(16, 120), Block())
    placement = nwp.place(model, torch.rand(4, 16), H1V2, neurons=["2"])
    assert [(p.name, p.neurons, p.recurrent) for p in placement.populations] == [("0", 16, False), ("2", 120, False)]
    assert placement.fits and sum(placement.populations[1].cores.values()) == 120


# --- the neuron rules ---------------------------------------------------------------------------


def neurons_net(front, hidden):
    return nn.Sequential(front, nn.Linear(16, 20), hidden)


def test_thresholds_that_differ_or_are_learned_and_a_reset_the_chip_does_not_have_are_refused():
    model = neurons_net(
        leaky(init_hidden=True, threshold=0.5, learn_threshold=True), leaky(init_hidden=True, threshold=2.0, reset_mechanism="zero")
    )
    placement = nwp.place(model, torch.rand(4, 16), H1V2)
    assert placement.problems == [
        "0: its threshold is learned (a Parameter); the chip's threshold is fixed, the same for every neuron",
        "2: it resets to zero; the chip resets by subtracting the threshold (ChipSpec.reset='subtract')",
        "the populations have different thresholds (0.5 for 0; 2 for 2); the chip has one fixed threshold for the whole network",
    ]
    on_h1v1 = nwp.place(neurons_net(leaky(init_hidden=True), leaky(init_hidden=True)), torch.rand(4, 16), nwp.H1V1)
    assert on_h1v1.problems == [
        "0: it resets by subtracting the threshold; the chip resets to zero (ChipSpec.reset='zero')",
        "2: it resets by subtracting the threshold; the chip resets to zero (ChipSpec.reset='zero')",
    ]
    unchecked = nwp.place(model, torch.rand(4, 16), nwp.ChipSpec(limit=1.66, cores=(50, 50, 100), reset=None))
    assert not any("resets" in line for line in unchecked.problems)


def test_a_neuron_whose_threshold_and_reset_cannot_be_read_is_a_note():
    class Spiking(nn.Module):
        def forward(self, x):
            return (x > 0).float()

    placement = nwp.place(nn.Sequential(Spiking(), nn.Linear(16, 10), Spiking()), torch.rand(4, 16), H1V2, neurons=["0", "2"])
    assert placement.fits
    assert sum("cannot be read" in note for note in placement.notes) == 4


def test_norse_neurons_are_read_their_recurrent_lif_is_recurrent_and_their_reset_to_v_reset_is_a_zero_reset():
    norse = pytest.importorskip("norse.torch", reason=not_installed("norse"))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))
            self.hidden = norse.LIFRecurrent(4, 30)
            self.out = norse.LIF()

        def forward(self, x):  # x: (time, batch, 4)
            spikes, _ = self.hidden(x * self.gain)
            return self.out(spikes)[0]

    placement = nwp.place(Net(), torch.rand(5, 2, 4), H1V2)
    assert [(p.name, p.neurons, p.recurrent, p.front_end) for p in placement.populations] == [
        ("hidden", 30, True, True), ("out", 30, False, False)
    ]
    assert placement.problems == [
        "hidden: the front end has 30 neurons; the chip feeds its 16 input channels one-to-one to the first layer, "
        "so it holds at most that many",
        "hidden: one of its neurons gets up to 4 input channels, and one channel reaches up to 30 of its neurons (through x * weight "
        "in the model, F.linear(x, weight) in hidden); the chip's input channels reach the front end one-to-one, with no fan-in "
        "or fan-out (nwp.FrontEnd, a gain per channel, or a diagonal matrix)",
        "hidden: it resets to zero; the chip resets by subtracting the threshold (ChipSpec.reset='subtract')",
        "out: it resets to zero; the chip resets by subtracting the threshold (ChipSpec.reset='subtract')",
    ]


# --- blocks -------------------------------------------------------------------------------------


def test_a_split_population_is_cut_between_blocks_and_starts_at_a_block():
    """The issue's network: front 16, feed-forward 40, recurrent 100, output 40 on H1v2."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.front, self.fc, self.ff = leaky(init_hidden=True), nn.Linear(16, 40), leaky(init_hidden=True)
            self.enc, self.rec = nn.Linear(40, 100), snn.RLeaky(linear_features=100, init_hidden=True, **SUBTRACT)
            self.read, self.out = nn.Linear(100, 40), leaky(init_hidden=True)

        def forward(self, x):
            return self.out(self.read(self.rec(self.enc(self.ff(self.fc(self.front(x)))))))

    placement = nwp.place(Net(), torch.rand(4, 16), H1V2)
    assert placement.fits
    assert_placed_in_blocks(placement, H1V2.cores, 5)
    front, ff, rec, out = placement.populations
    assert rec.cores == {2: 100} and rec.offsets == {2: 0}
    assert all(first % 5 == 0 for p in placement.populations for first in p.offsets.values())
    assert json.loads(json.dumps(placement.to_dict()))["populations"][2]["offsets"] == {"2": 0}


@pytest.mark.parametrize("neurons, cores, fits", [((4, 4), (8,), False), ((4, 4), (9,), True), ((3, 2), (5,), False), ((4,), (4,), True)])
def test_the_padding_to_whole_blocks_counts_against_a_core(neurons, cores, fits):
    """Populations of 4 take a block of 5 each, but a core's short last block (4 neurons of a core
    of 9) holds a population's short last block: two fit a core of 9, not one of 8."""
    model = Wired(list(neurons), [(j - 1, j) for j in range(1, len(neurons))], "modules")
    placement = nwp.place(model, torch.rand(2, 2, neurons[0]), nwp.ChipSpec(cores=cores, inputs=16, reset="subtract"))
    assert placement.fits == fits == placeable([(n, False) for n in neurons], cores, 5)


# --- place itself -------------------------------------------------------------------------------


class Creating(nn.Module):
    """A forward that adds a submodule and a hook to its own model, and draws random numbers."""

    def __init__(self):
        super().__init__()
        self.front, self.fc, self.out = leaky(init_hidden=True), nn.Linear(16, 10), leaky(init_hidden=True)

    def forward(self, x):
        if not hasattr(self, "made"):
            self.made = nn.Linear(2, 2)
            self.fc.register_forward_hook(lambda *args: None)
        return self.out(self.fc(self.front(x + 0.01 * torch.randn_like(x))))


def test_the_model_is_exactly_as_before_submodules_hooks_and_random_state_included():
    torch.manual_seed(0)
    model = Creating()
    reg = nwp.register(model, H1V2).harden(0.5)
    model.train()
    model.out.eval()
    before = snapshot(model)
    hooks = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    modes = [m.training for m in model.modules()]
    example = torch.rand(4, 16)
    random = torch.get_rng_state()
    placement = nwp.place(model, example)
    assert placement.spec == H1V2 and placement.fits
    assert not hasattr(model, "made") and [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()] == hooks
    assert torch.equal(torch.get_rng_state(), random) and [m.training for m in model.modules()] == modes
    assert_same_snapshot(before, snapshot(model))
    assert all(p.grad is None for p in model.parameters()) and reg.hardness == 0.5


def test_a_lazy_module_is_refused_in_one_line():
    model = nn.Sequential(leaky(init_hidden=True), nn.LazyLinear(10), leaky(init_hidden=True))
    with pytest.raises(ValueError, match=r"^1\.weight is not initialized yet \(a lazy module\): run one forward pass"):
        nwp.place(model, torch.rand(4, 16), H1V2)


def test_a_name_with_a_newline_stays_on_its_problem_line():
    model = nn.Sequential()
    model.add_module("front\nend", leaky(init_hidden=True))
    model.add_module("fc", nn.Linear(16, 120))
    model.add_module("hidden", snn.RLeaky(linear_features=120, init_hidden=True, **SUBTRACT))
    placement = nwp.place(model, torch.rand(4, 16), H1V2)
    assert placement.problems and all("\n" not in line for line in placement.problems + placement.notes)
    assert "front\\nend" in str(placement) and "front\nend" not in str(placement)


def test_without_neuron_modules_it_says_how_to_name_them():
    placement = nwp.place(nn.Sequential(nn.Linear(4, 8), nn.ReLU()), torch.rand(2, 4))
    assert not placement.fits and placement.populations == []
    assert len(placement.problems) == 1 and "neurons=(" in placement.problems[0]


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((nn.Linear(2, 2), [1.0]), {}, TypeError, "example must be a tensor"),
        ((nn.Linear(2, 2), torch.rand(2)), {"spec": 0.9}, TypeError, "spec must be a ChipSpec"),
        ((nn.Linear(2, 2), torch.rand(2)), {"neurons": ["lif"]}, ValueError, "neurons names 'lif'"),
        (("model", torch.rand(2)), {}, TypeError, "model must be an nn.Module"),
        ((nn.Linear(2, 2), torch.rand(3, 2)), {"dims": "tb c"}, ValueError, "dims='tb c' does not read an example of shape"),
    ],
)
def test_bad_arguments_are_refused_naming_them(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        nwp.place(*args, **kwargs)


def test_a_graph_built_before_placing_still_backpropagates():
    torch.manual_seed(0)
    model = RecurrentInForward(hidden=60)
    loss = model(torch.rand(3, 4, 16)).sum() + sum((p**2).sum() for p in model.parameters())
    versions = {k: v._version for k, v in model.state_dict(keep_vars=True).items()}
    nwp.place(model, torch.rand(3, 4, 16), H1V2)
    assert {k: v._version for k, v in model.state_dict(keep_vars=True).items()} == versions  # nothing written back needlessly
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# --- what the trace follows, however the forward writes it ----------------------------------------

RECURRENT = 120  # more than H1v2's largest core: a recurrent population this size does not fit


class FeedbackWritten(nn.Module):
    """A Leaky whose spikes come back through ``self.rec.weight`` (or a buffer), written one of many
    ways, and stored for the next step one of many ways."""

    FEEDBACK = {
        "a buffer matrix": lambda self, p: p @ self.fixed,
        "tensordot": lambda self, p: torch.tensordot(p, self.rec.weight, dims=([1], [1])),
        "inner": lambda self, p: torch.inner(p, self.rec.weight),
        "einsum of 3 operands": lambda self, p: torch.einsum("bi,oi,o->bo", p, self.rec.weight, torch.ones(RECURRENT)),
        "einsum with ...": lambda self, p: torch.einsum("...i,oi->...o", p, self.rec.weight),
        "multi_dot": lambda self, p: torch.linalg.multi_dot([p, self.rec.weight.T]),
        "a broadcast product and a sum": lambda self, p: (p.unsqueeze(1) * self.rec.weight).sum(-1),
        "an orthogonal Linear": lambda self, p: self.orthogonal(p),
    }
    STORE = {
        "prev = spk": lambda prev, spk: spk,
        "prev[:] = spk": lambda prev, spk: (prev.__setitem__(slice(None), spk), prev)[1],
        "prev.data = spk": lambda prev, spk: (setattr(prev, "data", spk), prev)[1],
        "prev.copy_(spk)": lambda prev, spk: prev.copy_(spk),
    }

    def __init__(self, feedback="tensordot", store="prev = spk"):
        super().__init__()
        self.feedback, self.store = self.FEEDBACK[feedback], self.STORE[store]
        self.front, self.encode, self.lif = leaky(init_hidden=True), nn.Linear(16, RECURRENT), leaky()
        self.rec = nn.Linear(RECURRENT, RECURRENT, bias=False)
        self.orthogonal = nn.utils.parametrizations.orthogonal(nn.Linear(RECURRENT, RECURRENT, bias=False))
        self.register_buffer("fixed", torch.randn(RECURRENT, RECURRENT))

    def forward(self, x):
        mem, prev = self.lif.reset_mem(), torch.zeros(x.shape[1], RECURRENT)
        for x_t in x:
            spikes, mem = self.lif(self.encode(self.front(x_t)) + self.feedback(self, prev), mem)
            prev = self.store(prev, spikes)
        return spikes


@pytest.mark.parametrize("feedback", list(FeedbackWritten.FEEDBACK))
def test_recurrence_through_any_op_that_mixes_with_a_weight_is_recurrent(feedback):
    placement = nwp.place(FeedbackWritten(feedback), torch.rand(4, 2, 16), H1V2)
    assert [(p.name, p.recurrent) for p in placement.populations] == [("front", False), ("lif", True)]
    assert placement.problems == ["lif: a recurrent population of 120 neurons sits whole in one core, and the largest core holds 100"]


@pytest.mark.parametrize("store", list(FeedbackWritten.STORE))
def test_recurrence_through_state_stored_in_place_is_recurrent(store):
    placement = nwp.place(FeedbackWritten("tensordot", store), torch.rand(4, 2, 16), H1V2)
    assert [p.recurrent for p in placement.populations] == [False, True]


class FrontWritten(nn.Module):
    """16 channels into a front-end Leaky, through one of many ways of (not) mixing them."""

    WAYS = {  # way -> (the forward's mixing, whether it is one-to-one)
        "a gain": (lambda self, x: x * self.gain, True),
        "nwp.FrontEnd": (lambda self, x: self.front_end(x), True),
        "a permutation matrix": (lambda self, x: x @ torch.eye(16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))], True),
        "two diagonals, one flipped": (lambda self, x: x * self.gain + x.flip(-1) * self.other, False),
        "two gains, one rolled": (lambda self, x: x * self.gain + x.roll(1, -1) * self.other, False),
        "a cat of two gains on one half": (lambda self, x: torch.cat([x[:, :8] * self.gain[:8], x[:, :8] * self.other[:8]], -1), False),
        "a broadcast product and a sum": (lambda self, x: (x.unsqueeze(-1) * self.dense).sum(-2), False),
        "x.sum expanded": (lambda self, x: x.sum(-1, keepdim=True).expand(-1, 16), False),
        "tensordot": (lambda self, x: torch.tensordot(x, self.dense, dims=1), False),
        "einsum with ...": (lambda self, x: torch.einsum("...i,io->...o", x, self.dense), False),
        "a dense buffer": (lambda self, x: x @ self.fixed, False),
        "an orthogonal Linear": (lambda self, x: self.orthogonal(x), False),
        "a dense matrix with tiny off-diagonal entries": (lambda self, x: x @ (torch.eye(16) + 1e-12 * (1 - torch.eye(16))), False),
        "a layer norm": (lambda self, x: nn.functional.layer_norm(x, (16,)), False),
        "a softmax": (lambda self, x: x.softmax(-1), False),
        "a cumsum": (lambda self, x: x.cumsum(-1), False),
        "a sort": (lambda self, x: x.sort(-1).values, False),
        "F.normalize": (lambda self, x: nn.functional.normalize(x, dim=-1), False),
        "an average pooling": (lambda self, x: nn.functional.avg_pool1d(x.unsqueeze(1), 3, 1, 1).squeeze(1), False),
        "a sigmoid, a clamp and a dropout": (lambda self, x: nn.functional.dropout(x.sigmoid().clamp(0.1, 0.9), 0.0), True),
    }

    def __init__(self, way):
        super().__init__()
        self.mix, _ = self.WAYS[way]
        self.gain, self.other = nn.Parameter(torch.rand(16) + 0.5), nn.Parameter(torch.rand(16) + 0.5)
        self.dense = nn.Parameter(torch.randn(16, 16))
        self.front_end = nwp.FrontEnd(16)
        self.orthogonal = nn.utils.parametrizations.orthogonal(nn.Linear(16, 16, bias=False))
        self.register_buffer("fixed", torch.randn(16, 16))
        self.front, self.encode, self.out = leaky(init_hidden=True), nn.Linear(16, 20), leaky(init_hidden=True)

    def forward(self, x):
        return self.out(self.encode(self.front(self.mix(self, x))))


@pytest.mark.parametrize("way", list(FrontWritten.WAYS))
def test_the_front_end_is_one_to_one_only_when_the_channels_reach_it_so(way):
    placement = nwp.place(FrontWritten(way), torch.rand(4, 16), H1V2)
    one_to_one = FrontWritten.WAYS[way][1]
    assert placement.fits == one_to_one, placement.problems
    if not one_to_one:
        assert len(placement.problems) == 1 and placement.problems[0].startswith("front: ")
        assert placement.problems[0].endswith(
            "the chip's input channels reach the front end one-to-one, with no fan-in or fan-out "
            "(nwp.FrontEnd, a gain per channel, or a diagonal matrix)"
        )


def test_one_weight_used_at_two_places_joins_no_populations():
    class Net(nn.Module):  # one Linear for a -> b and for b -> c: no population feeds itself
        def __init__(self):
            super().__init__()
            self.front, self.a, self.b, self.c = (leaky(init_hidden=True) for _ in range(4))
            self.encode, self.shared = nn.Linear(16, 30), nn.Linear(30, 30)

        def forward(self, x):
            for x_t in x:
                out = self.c(self.shared(self.b(self.shared(self.a(self.encode(self.front(x_t)))))))
            return out

    placement = nwp.place(Net(), torch.rand(3, 2, 16), H1V2)
    assert [(p.name, p.recurrent) for p in placement.populations] == [("front", False), ("a", False), ("b", False), ("c", False)]
    assert placement.fits and not placement.notes


def test_a_module_named_in_neurons_is_checked_by_the_neurons_inside_it():
    class Block(nn.Module):
        def __init__(self, n, **neuron):
            super().__init__()
            self.fc, self.lif = nn.Linear(n, n), leaky(init_hidden=True, **neuron)

        def forward(self, x):
            return self.lif(self.fc(x))

    class Padded(nn.Module):  # its input zero-padded in place: lost to nothing, not the block's own state
        def __init__(self):
            super().__init__()
            self.front, self.block = leaky(init_hidden=True), Block(120)

        def forward(self, x):
            padded = torch.zeros(x.shape[0], 120)
            padded[:, :16] = self.front(x)
            return self.block(padded)

    padded = nwp.place(Padded(), torch.rand(4, 16), H1V2, neurons=["block"])
    assert [(p.name, p.neurons, p.recurrent) for p in padded.populations] == [("front", 16, False), ("block", 120, False)]
    assert padded.fits

    wrapped = nn.Sequential(
        leaky(init_hidden=True), nn.Linear(16, 40), Block(40, threshold=0.5, learn_threshold=True, reset_mechanism="zero")
    )
    placement = nwp.place(wrapped, torch.rand(4, 16), H1V2, neurons=["2"])
    assert placement.problems == [
        "2: its threshold is learned (a Parameter); the chip's threshold is fixed, the same for every neuron",
        "2: it resets to zero; the chip resets by subtracting the threshold (ChipSpec.reset='subtract')",
        "the populations have different thresholds (0.5 for 2; 1 for 0); the chip has one fixed threshold for the whole network",
    ]


def test_a_module_named_in_neurons_holding_two_layers_is_refused_naming_them():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.l1, self.fc2, self.l2 = nn.Linear(16, 90), leaky(init_hidden=True), nn.Linear(90, 30), leaky(init_hidden=True)

        def forward(self, x):
            return self.l2(self.fc2(self.l1(self.fc1(x))))

    net = nn.Sequential(leaky(init_hidden=True), nn.Linear(16, 16), Two(), nn.Linear(30, 100), leaky(init_hidden=True))
    placement = nwp.place(net, torch.rand(4, 16), H1V2, neurons=["2"])
    assert not placement.fits
    assert (
        "2 (named in neurons) holds several layers of neurons (l1, l2): a population is one layer; name the layers inside it instead"
        in placement.problems
    )


def test_one_leaky_restarting_its_state_for_two_layers_of_two_sizes_makes_two_populations():
    class Net(nn.Module):  # snnTorch starts its state afresh when the size changes: two layers over time
        def __init__(self):
            super().__init__()
            self.front, self.lif = leaky(init_hidden=True), leaky()
            self.fc1, self.fc2 = nn.Linear(16, 100), nn.Linear(100, 90)

        def forward(self, x):
            for x_t in x:
                first, _ = self.lif(self.fc1(self.front(x_t)))
                second, _ = self.lif(self.fc2(first))
            return second

    placement = nwp.place(Net(), torch.rand(5, 2, 16), H1V2)
    assert [(p.name, p.neurons, p.recurrent) for p in placement.populations] == [
        ("front", 16, False), ("lif[0]", 100, False), ("lif[1]", 90, False)
    ]
    assert placement.problems == ["the network has 206 neurons; the chip holds 200 (50 + 50 + 100)"]
    assert placement.notes == [
        "lif: its calls each start their state afresh; those of one size fed by the same weights are read as one layer over time"
    ]


@pytest.mark.parametrize("kept", ["a plain attribute", "a persistent buffer"])
def test_a_hand_written_neuron_keeping_its_membrane_is_one_population(kept):
    class Neuron(nn.Module):
        threshold, reset_mechanism = 1.0, "subtract"

        def __init__(self):
            super().__init__()
            if kept == "a persistent buffer":
                self.register_buffer("mem", torch.zeros(()))
            else:
                self.mem = torch.zeros(())

        def forward(self, current):
            mem = self.mem * 0.9 + current
            spikes = (mem > self.threshold).float()
            self.mem = mem - spikes * self.threshold
            return spikes

    net = nn.Sequential(leaky(init_hidden=True), nn.Linear(16, 40), Neuron())
    placement = nwp.place(net, torch.rand(5, 2, 16), H1V2, neurons=["2"])
    assert [(p.name, p.neurons) for p in placement.populations] == [("0", 16), ("2", 40)]
    assert placement.fits


def test_equal_thresholds_held_at_two_precisions_are_one_threshold():
    class Spike(nn.Module):
        threshold, reset_mechanism = 0.1, "subtract"

        def forward(self, x):
            return (x > self.threshold).float()

    net = nn.Sequential(Spike(), nn.Linear(16, 10), leaky(threshold=0.1, init_hidden=True))
    assert nwp.place(net, torch.rand(4, 16), H1V2, neurons=["0"]).problems == []
    net[2].threshold.fill_(0.2)
    assert nwp.place(net, torch.rand(4, 16), H1V2, neurons=["0"]).problems == [
        "the populations have different thresholds (0.100000001 for 0; 0.200000003 for 2); "
        "the chip has one fixed threshold for the whole network"
    ]


def test_a_split_population_with_two_pieces_in_one_core_keeps_all_its_neurons():
    from nwave_param.placement.assignment import assign as _assign
    from nwave_param.placement.result import Population

    populations = [Population("p0", 59, False, True), Population("p1", 4, False, False), Population("p2", 30, True, False)]
    placed, problems = _assign(populations, H1V2.replace(cores=(64, 64)))
    assert problems == []
    for p in placed:
        assert sum(p.cores.values()) == p.neurons
    assert_placed_in_blocks(nwp.Placement(H1V2.replace(cores=(64, 64)), placed, [], []), (64, 64), 5)


def test_a_compiled_model_is_placed_as_its_module():
    net = RecurrentInForward()
    compiled = torch.compile(net)
    assert nwp.place(compiled, torch.rand(3, 2, 16), H1V2).problems == nwp.place(net, torch.rand(3, 2, 16), H1V2).problems != []


def test_a_five_dim_example_is_read_time_first_as_event_frames():
    class Frames(nn.Module):  # (time, batch, 1, 4, 4): 16 channels a step
        def __init__(self):
            super().__init__()
            self.front, self.encode, self.out = leaky(init_hidden=True), nn.Linear(16, 10), leaky(init_hidden=True)

        def forward(self, x):
            return torch.stack([self.out(self.encode(self.front(x_t.flatten(1)))) for x_t in x])

    placement = nwp.place(Frames(), torch.rand(3, 2, 1, 4, 4), H1V2)
    assert [(p.name, p.neurons) for p in placement.populations] == [("front", 16), ("out", 10)]
    assert placement.notes == [  # its channels along two dims: the front end cannot be checked, and it says how to
        "the example has its channels along 2 dims, and the trace follows them along one: to check the front end, give the "
        "example with its channels flattened (e.g. x.flatten(2), dims='tbc')"
    ]
    assert not placement.fits
    flat = nwp.place(Frames(), torch.rand(3, 2, 1, 16, 1), H1V2)  # one channel dim of more than one: followed
    assert flat.fits and not flat.notes


class LateralWritten(nn.Module):
    """120 neurons whose spikes reach each other with no weight on the way."""

    LATERAL = {
        "a global inhibition": lambda spikes: -0.5 * spikes.sum(-1, keepdim=True),
        "a softmax": lambda spikes: spikes.softmax(-1),
    }

    def __init__(self, lateral):
        super().__init__()
        self.lateral = self.LATERAL[lateral]
        self.front, self.encode, self.lif = leaky(init_hidden=True), nn.Linear(16, RECURRENT), leaky()

    def forward(self, x):
        mem, spikes = self.lif.reset_mem(), torch.zeros(x.shape[1], RECURRENT)
        for x_t in x:
            spikes, mem = self.lif(self.encode(self.front(x_t)) + self.lateral(spikes), mem)
        return spikes


@pytest.mark.parametrize("lateral", list(LateralWritten.LATERAL))
def test_spikes_reaching_their_own_population_through_an_op_that_mixes_them_are_recurrent(lateral):
    placement = nwp.place(LateralWritten(lateral), torch.rand(4, 2, 16), H1V2)
    assert [p.recurrent for p in placement.populations] == [False, True]
    assert placement.problems == ["lif: a recurrent population of 120 neurons sits whole in one core, and the largest core holds 100"]


def test_snntorch_inhibition_is_recurrent_with_a_note():
    net = nn.Sequential(leaky(init_hidden=True), nn.Linear(16, 40), leaky(init_hidden=True, inhibition=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # snnTorch: "Inhibition is an unstable feature"
        placement = nwp.place(net, torch.rand(4, 16), H1V2)
    assert [p.recurrent for p in placement.populations] == [False, True] and placement.fits
    assert placement.notes == [
        "2: inhibition=True (each neuron inhibits the others) is read as recurrent: the chip holds it as synapses within one core"
    ]


class OneStepPerCall(nn.Module):
    """A model stepped once per call: it keeps its last spikes in a buffer for the next call."""

    def __init__(self):
        super().__init__()
        self.front, self.encode, self.lif = leaky(init_hidden=True), nn.Linear(16, RECURRENT), leaky(init_hidden=True)
        self.feedback = nn.Linear(RECURRENT, RECURRENT)
        self.register_buffer("prev", torch.zeros(1, RECURRENT))

    def forward(self, x):  # x: (batch, 16), one time step
        spikes = self.lif(self.encode(self.front(x)) + self.feedback(self.prev))
        self.prev = spikes
        return spikes


def test_state_a_model_keeps_between_calls_is_read_over_two_calls():
    placement = nwp.place(OneStepPerCall(), torch.rand(1, 16), H1V2)
    assert [p.recurrent for p in placement.populations] == [False, True]
    assert placement.notes == ["prev carries activations from one call to the next: read over two calls of the model"]
    reg = nwp.register(OneStepPerCall(), H1V2, example=torch.rand(1, 16))
    assert reg.names == ["encode.weight", "feedback.weight"]


def test_one_zeros_tensor_starting_two_layers_makes_two_populations():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.front, self.lif, self.first, self.second = leaky(init_hidden=True), leaky(), nn.Linear(16, 100), nn.Linear(100, 100)

        def forward(self, x):
            first = second = torch.zeros(x.shape[1], 100)  # one tensor starts both layers' membranes
            for x_t in x:
                spikes, first = self.lif(self.first(self.front(x_t)), first)
                out, second = self.lif(self.second(spikes), second)
            return out

    placement = nwp.place(Net(), torch.rand(3, 2, 16), H1V2)
    assert [(p.name, p.neurons) for p in placement.populations] == [("front", 16), ("lif[0]", 100), ("lif[1]", 100)]
    assert placement.problems == ["the network has 216 neurons; the chip holds 200 (50 + 50 + 100)"] and placement.notes == []


def test_one_module_stepping_twice_as_often_as_the_others_is_said_in_a_note():
    lif = leaky(init_hidden=True)
    net = nn.Sequential(leaky(init_hidden=True), nn.Linear(16, 100), lif, nn.Linear(100, 100), lif)
    placement = nwp.place(net, torch.rand(2, 16), H1V2)
    assert placement.notes == [
        "2: called 2 times where other populations step 1 times, continuing one chain of state (one population); if its calls "
        "are several layers, give each layer a module (or a state) of its own"
    ]


def test_a_model_on_the_meta_device_is_refused_in_one_line():
    net = nn.Sequential(leaky(init_hidden=True), nn.Linear(16, 10, device="meta"), leaky(init_hidden=True))
    with pytest.raises(ValueError, match=r"^1.weight is on the meta device: the trace computes, so materialize the model"):
        nwp.place(net, torch.rand(2, 16), H1V2)


def test_thresholds_equal_within_bfloat16_precision_are_one():
    class Spike(nn.Module):  # its threshold held in bfloat16: 0.10009765625
        reset_mechanism = "subtract"

        def __init__(self):
            super().__init__()
            self.register_buffer("threshold", torch.tensor(0.1, dtype=torch.bfloat16))

        def forward(self, x):
            return (x > self.threshold).float()

    net = nn.Sequential(Spike(), nn.Linear(16, 10), leaky(init_hidden=True, threshold=0.1))
    assert nwp.place(net, torch.rand(2, 16), H1V2, neurons=["0"]).problems == []


@pytest.mark.parametrize("series", [False, True])
def test_two_weights_in_series_with_no_neurons_between_are_a_note(series):
    """The chip holds one synapse matrix from a population to the next; two weights in series are
    constrained each, not as what they compute together: said, naming both."""
    layers = [nn.Linear(16, 30), nn.Linear(30, 20)] if series else [nn.Linear(16, 20)]
    model = nn.Sequential(nwp.FrontEnd(16), leaky(init_hidden=True), *layers, leaky(init_hidden=True))
    placement = nwp.place(model, torch.rand(3, 16), H1V2)
    said = [note for note in placement.notes if "two weights in series with no neurons between" in note]
    assert placement.fits and said == (["F.linear(x, weight) in 3 reads the current of F.linear(x, weight) in 2: 2.weight and 3.weight "
                                        "are two weights in series with no neurons between; the chip holds one synapse matrix from a "
                                        "population to the next, and nwave_param constrains each weight, not what they compute "
                                        "together: make them one weight, or put neurons between"] if series else [])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dims=st.integers(1, 2), transposed=st.booleans(), channels=st.integers(1, 7), data=st.data())
def test_a_convolution_carrying_one_input_to_several_positions_is_a_note(dims, transposed, channels, data):
    """The chip holds a convolution unrolled; where its kernel carries one input to several output
    positions, each through another offset, the population's blocks of 5 must be channels at one
    position: said, with the neurons that takes, exactly where a one-hot input reaches two
    positions of one channel."""
    draw = lambda strategy: data.draw(strategy)  # noqa: E731
    kernel, stride, dilation, length = (draw(st.lists(st.integers(low, high), min_size=dims, max_size=dims))
                                        for low, high in ((1, 4), (1, 4), (1, 3), (1, 6)))
    padding = [draw(st.integers(0, d * (k - 1))) for k, d in zip(kernel, dilation)]
    conv_type = getattr(nn, f"Conv{'Transpose' if transposed else ''}{dims}d")
    conv = conv_type(2, channels, kernel, stride=stride, padding=padding, dilation=dilation)
    try:
        positions = conv(torch.zeros(1, 2, *length)).shape[2:].numel()
    except RuntimeError:  # a kernel past the padded input
        positions = 0
    assume(positions > 0)
    # the plain formula: each input position alone, through a kernel of ones, and the output positions it reaches
    ones = conv_type(1, 1, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    nn.init.ones_(ones.weight)
    reach = 0
    for at in torch.eye(torch.Size(length).numel()):
        with torch.no_grad():
            reach = max(reach, int(ones(at.reshape(1, 1, *length)).count_nonzero()))
    placement = nwp.place(nn.Sequential(conv, leaky(init_hidden=True)), torch.rand(3, 2, *length), H1V2)
    said = [note for note in placement.notes if "channels-last" in note]
    padded = math.ceil(channels / 5) * 5
    assert said == ([
        f"1: {conv_type.__name__.lower().replace('transpose', '_transpose')}(x, weight) in 0 applies 0.weight at {positions} positions, "
        f"one input reaching up to {reach} of them through as many kernel offsets, and nwave_param makes the weights of one offset "
        "share a sign in blocks of 5 output channels: on the chip, laying these neurons out channels-last, each position's channels "
        "padded to whole blocks of 5, keeps every block at one offset"
        + (f" ({padded} neurons a position, {padded * positions} in all, against the {channels * positions} placed here)"
           * (padded > channels))
        + "; laid out channel by channel, a block may mix offsets"
    ] if reach > 1 else [])


def test_a_convolution_over_time_read_one_step_at_a_time_is_no_note():
    """Its neurons are its channels at one time step: no map is unrolled across the population."""

    class OverTime(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lif = nn.Conv1d(4, 20, 3, padding=1), leaky()

        def forward(self, x):  # (batch, channels, time)
            current, membrane, spikes = self.conv(x), self.lif.init_leaky(), []
            for t in range(x.shape[2]):
                spike, membrane = self.lif(current[:, :, t], membrane)
                spikes.append(spike)
            return torch.stack(spikes)

    placement = nwp.place(OverTime(), torch.rand(2, 4, 8), H1V2)
    assert [p.neurons for p in placement.populations] == [20]
    assert [note for note in placement.notes if "channels-last" in note] == []


class _Stepped(nn.Module):
    """A convolution over (frequency, time), its output read by the neurons a time step at a time."""

    def __init__(self, kernel):
        super().__init__()
        self.conv, self.lif = nn.Conv2d(1, 8, kernel, padding=(kernel[0] // 2, kernel[1] // 2)), leaky()

    def forward(self, x):  # (batch, 1, frequency, time)
        current, membrane, spikes = self.conv(x), self.lif.init_leaky(), []
        for t in range(x.shape[3]):
            spike, membrane = self.lif(current[..., t].flatten(1), membrane)
            spikes.append(spike)
        return torch.stack(spikes)


class _SideBySide(nn.Module):
    """Two convolutions' maps side by side in one population."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.lif = nn.Conv1d(2, 6, 3), nn.Conv1d(2, 4, 3), leaky(init_hidden=True)

    def forward(self, x):
        return self.lif(torch.cat([self.a(x).flatten(1), self.b(x).flatten(1)], 1))


class _Repeated(nn.Module):
    """A convolution's whole map, the same weight stepped five times."""

    def __init__(self):
        super().__init__()
        self.conv, self.lif = nn.Conv1d(2, 3, 3), leaky()

    def forward(self, x):  # (time, batch, 2, 6)
        membrane, spikes = self.lif.init_leaky(), []
        for step in x:
            spike, membrane = self.lif(self.conv(step), membrane)
            spikes.append(spike)
        return torch.stack(spikes)


@pytest.mark.parametrize(
    "model, example, noted",
    [
        (_Stepped((1, 3)), torch.rand(2, 1, 6, 5), 0),  # a step holds no map the kernel crosses
        (_Stepped((3, 3)), torch.rand(2, 1, 6, 5), 0),  # a step holds part of the map: not read
        (_SideBySide(), torch.rand(2, 2, 5), 0),  # two maps in one population: not read
        (_Repeated(), torch.rand(5, 2, 2, 6), 1),  # one note, not one a step
    ],
    ids=["over-time-kernel-1-in-frequency", "over-time-3x3", "two-maps-side-by-side", "stepped-five-times"],
)
def test_the_convolution_note_reads_only_a_population_holding_one_whole_map_once(model, example, noted):
    """A population holding part of a convolution's map, or two maps side by side, is not read
    (its positions are not the map's), and a convolution stepped over time is noted once."""
    placement = nwp.place(model, example, H1V2)
    said = [note for note in placement.notes if "channels-last" in note]
    assert len(said) == noted
    start = "lif: conv1d(x, weight) in conv applies conv.weight at 4 positions, one input reaching up to 3 of them"
    assert all(note.startswith(start) for note in said)


def test_two_convolutions_made_in_the_forward_are_noted_each():
    """Fixed synapses share one name ("a tensor made in the forward"): told apart by their reach."""

    class Made(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = leaky(init_hidden=True)

        def forward(self, x):  # (batch, 2, 6): both maps have 4 positions of 3 channels
            narrow = nn.functional.conv1d(x, torch.ones(3, 2, 3))
            wide = nn.functional.conv1d(x, torch.ones(3, 2, 5), padding=1)
            return self.lif(narrow + wide)

    said = [note for note in nwp.place(Made(), torch.rand(2, 2, 6), H1V2).notes if "channels-last" in note]
    assert [re.search(r"reaching up to (\d+)", note)[1] for note in said] == ["3", "4"]
