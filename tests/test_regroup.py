"""Regrouping: ``functional.grouping`` (an order of rows whose sign-sharing blocks hold less
minority-sign mass) against the formulas written out here, and ``nwp.regroup_`` (a network's hidden
neurons reordered alike everywhere, the function unchanged, the optimizer's state with them)."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layers import assert_same_snapshot, same_bits, snapshot
from torch import nn

import nwave_param as nwp
import nwave_param.placement.regroup as regroup_module
from nwave_param.functional import grouping

# --- the math -----------------------------------------------------------------------------------------


def minority(m, size):
    """Sum over blocks of ``size`` consecutive rows (the last may be shorter) and columns of
    min(positive mass, negative mass), written out."""
    total = 0.0
    for start in range(0, len(m), size):
        for column in range(m.shape[1]):
            values = [float(m[row, column]) for row in range(start, min(start + size, len(m)))]
            total += min(sum(v for v in values if v > 0), sum(-v for v in values if v < 0))
    return total


matrices = st.integers(1, 14).flatmap(
    lambda rows: st.integers(1, 5).flatmap(
        lambda columns: st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=rows * columns, max_size=rows * columns).map(
            lambda values: torch.tensor(values).view(rows, columns)
        )
    )
)


@settings(max_examples=60, deadline=None)
@given(m=matrices, size=st.integers(1, 6))
def test_grouping_is_a_permutation_that_never_costs_more_and_no_swap_between_blocks_lowers(m, size):
    order = grouping(m, size)
    assert order.dtype == torch.int64 and sorted(order.tolist()) == list(range(len(m)))
    after = minority(m[order], size)
    assert after <= minority(m, size) + 1e-6
    for i, j in itertools.combinations(range(len(m)), 2):
        if i // size != j // size:
            swapped = order.clone()
            swapped[i], swapped[j] = order[j], order[i]
            assert minority(m[swapped], size) >= after - 1e-5 * (1 + after)


def test_grouping_aligns_what_can_be_aligned():
    m = torch.tensor([[1.0, -1.0], [-1.0, 1.0]] * 5)  # two kinds of rows, alternating: every block mixed
    order = grouping(m, 5)
    assert minority(m, 5) > 0 and minority(m[order], 5) == 0


@pytest.mark.parametrize(
    "m, size, error, match",
    [
        (torch.zeros(3, 2), 0, ValueError, "group_size must be positive"),
        (torch.zeros(3, 2), 2.0, TypeError, "group_size must be an int"),
        (torch.zeros(3, 2), True, TypeError, "group_size must be an int"),
        (torch.zeros(3), 2, ValueError, "m must be .rows, columns., got shape .3,."),
        ([[1.0]], 2, TypeError, "m must be a tensor"),
        (torch.tensor([[1.0], [float("nan")]]), 2, ValueError, "m holds NaN or inf"),
    ],
)
def test_grouping_refuses_bad_arguments_naming_them(m, size, error, match):
    with pytest.raises(error, match=match):
        grouping(m, size)


# --- a network ----------------------------------------------------------------------------------------


class LIF(nn.Module):
    """A plain leaky integrate-and-fire neuron: ``(spikes, membrane)``; no snnTorch needed."""

    def forward(self, current, membrane):
        membrane = 0.75 * membrane + current
        spikes = (membrane > 1.0).to(current.dtype)
        return spikes, membrane - spikes


class Net(nn.Module):
    """front (fed the input) -> recurrent hidden (recurrence written in forward) -> a second hidden
    population -> out (its spike counts are the output)."""

    NEURONS = ("front", "lif", "lif2", "out")

    def __init__(self, channels, hidden, second, outputs):
        super().__init__()
        self.front, self.lif, self.lif2, self.out = LIF(), LIF(), LIF(), LIF()
        self.encode, self.recurrent = nn.Linear(channels, hidden), nn.Linear(hidden, hidden, bias=False)
        self.link, self.readout = nn.Linear(hidden, second), nn.Linear(second, outputs)
        self.hidden, self.second, self.outputs = hidden, second, outputs

    def forward(self, x):  # (time, batch, channels)
        batch = x.shape[1]
        f, h, h2, o = (torch.zeros(batch, n) for n in (x.shape[2], self.hidden, self.second, self.outputs))
        spikes, counts = torch.zeros(batch, self.hidden), 0
        for x_t in x:
            front, f = self.front(x_t, f)
            spikes, h = self.lif(self.encode(front) + self.recurrent(spikes), h)
            second, h2 = self.lif2(self.link(spikes), h2)
            out, o = self.out(self.readout(second), o)
            counts = counts + out
        return counts


def dyadic_net(seed, channels, hidden, second, outputs, transposed=False):
    """Weights on multiples of 1/16, so every sum is exact in any order: the outputs compare bit for bit."""
    torch.manual_seed(seed)
    net = Net(channels, hidden, second, outputs)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.randn_like(p) * 16).round() / 16)
    if transposed:  # stored transposed: a non-contiguous weight, read by logical index
        net.encode.weight = nn.Parameter(net.encode.weight.detach().t().contiguous().t())
    return net


def example(seed, channels):
    torch.manual_seed(seed + 1)
    return 3 * torch.rand(6, 4, channels)


sizes = st.tuples(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 17), st.integers(1, 12), st.integers(1, 4), st.booleans())


@settings(max_examples=25, deadline=None)
@given(case=sizes)
def test_regroup_moves_every_tensor_of_a_population_alike_and_the_network_computes_the_same(case):
    seed, channels, hidden, second, outputs, transposed = case
    net = dyadic_net(seed, channels, hidden, second, outputs, transposed)
    x = example(seed, channels)
    before, tensors = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    result = nwp.regroup_(net, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert torch.equal(net(x), before)
    p = result.orders.get("lif", torch.arange(hidden))
    q = result.orders.get("lif2", torch.arange(second))
    expected = {
        "encode.weight": tensors["encode.weight"][p],
        "encode.bias": tensors["encode.bias"][p],
        "recurrent.weight": tensors["recurrent.weight"][p][:, p],
        "link.weight": tensors["link.weight"][q][:, p],
        "link.bias": tensors["link.bias"][q],
        "readout.weight": tensors["readout.weight"][:, q],
        "readout.bias": tensors["readout.bias"],
    }
    for name, value in expected.items():
        assert same_bits(net.state_dict()[name], value), name
    assert set(result.kept) - {"lif", "lif2"} == {"front", "out"}
    assert all("never spike" in result.kept[p] for p in set(result.kept) & {"lif", "lif2"})  # silent on this example
    for name, (was, now) in result.minority.items():
        assert now <= was + 1e-6
        weights = {"lif": ("encode.weight", "recurrent.weight"), "lif2": ("link.weight",)}[name]
        order = result.orders.get(name, torch.arange(len(tensors[weights[0]])))
        rows = torch.cat([tensors[w] for w in weights], 1)
        assert now == pytest.approx(minority(rows[order], 5), rel=1e-5, abs=1e-6)


def test_the_optimizers_moments_move_with_the_parameters():
    net, x = dyadic_net(0, 3, 12, 7, 2), example(0, 3)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    sum((p * torch.randn_like(p)).sum() for p in net.parameters()).backward()  # a moment of its own for every entry
    optimizer.step()
    moments = {(name, k): optimizer.state[p][k].clone() for name, p in net.named_parameters() for k in ("exp_avg", "exp_avg_sq")}
    result = nwp.regroup_(net, x, optimizer, spec=nwp.H1V2, neurons=Net.NEURONS)
    p, q = result.orders["lif"], result.orders.get("lif2", torch.arange(7))
    moved = {  # each parameter as its neurons moved: rows by the population it feeds, columns by the one it reads
        "encode.weight": lambda t: t[p],
        "encode.bias": lambda t: t[p],
        "recurrent.weight": lambda t: t[p][:, p],
        "link.weight": lambda t: t[q][:, p],
        "link.bias": lambda t: t[q],
        "readout.weight": lambda t: t[:, q],
        "readout.bias": lambda t: t,
    }
    for name, parameter in net.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert same_bits(optimizer.state[parameter][k], moved[name](moments[name, k])), (name, k)


def test_populations_whose_order_shows_keep_it_and_say_why():
    class Visible(Net):
        def forward(self, x):
            counts = super().forward(x)
            return counts, self.encode(torch.ones(1, x.shape[2]))  # the hidden population's currents, as an output

    net, x = dyadic_net(3, 3, 12, 7, 2), example(3, 3)
    visible = Visible(3, 12, 7, 2)
    visible.load_state_dict(net.state_dict())
    before = copy.deepcopy(visible.state_dict())
    result = nwp.regroup_(visible, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert "lif" in result.kept and "computes otherwise" in result.kept["lif"]
    assert "front end" in result.kept["front"] and "output" in result.kept["out"]
    assert all(same_bits(before[k], visible.state_dict()[k]) for k in ("encode.weight", "encode.bias", "recurrent.weight"))


def assert_all_kept_and_nothing_moved(net, x, reason):
    """regroup_ keeps both hidden populations' orders, saying ``reason``, and the model is as it was."""
    before = snapshot(net)
    result = nwp.regroup_(net, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert not result.orders and all(reason in result.kept[p] for p in ("lif", "lif2"))
    assert_same_snapshot(before, snapshot(net))


def test_a_plan_that_misses_a_tensor_is_caught_by_the_check_and_changes_nothing(monkeypatch):
    net, x = dyadic_net(5, 3, 12, 7, 2), example(5, 3)
    plan = regroup_module._plan

    def missing_the_weight_that_reads_it(model, traced, p, front):
        found = plan(model, traced, p, front)
        if isinstance(found, str):
            return found
        moves, incoming = found
        return tuple(m for m in moves if m not in (("link.weight", (1,)), ("readout.weight", (1,)))), incoming

    monkeypatch.setattr(regroup_module, "_plan", missing_the_weight_that_reads_it)
    assert_all_kept_and_nothing_moved(net, x, "computes otherwise")


def test_a_hardened_model_is_refused_and_left_as_it_was():
    net, x = dyadic_net(1, 3, 12, 7, 2), example(1, 3)
    reg = nwp.register(net, nwp.H1V2)
    reg.harden(0.5)
    before = snapshot(net)
    with pytest.raises(ValueError, match="hardness 0.5.*regroup before hardening"):
        nwp.regroup_(net, x, neurons=Net.NEURONS)
    assert_same_snapshot(before, snapshot(net))


def test_a_registered_model_keeps_its_keys_and_a_copy_follows_with_apply():
    net, x = dyadic_net(2, 3, 14, 9, 2), example(2, 3)
    reg = nwp.register(net, nwp.H1V1)
    twin = copy.deepcopy(net)
    keys = list(net.state_dict())
    result = nwp.regroup_(net, x, neurons=Net.NEURONS)
    assert result.orders and list(net.state_dict()) == keys and reg.hardness == 0
    result.apply_(twin)
    assert all(same_bits(a, b) for a, b in zip(net.state_dict().values(), twin.state_dict().values()))
    again = nwp.regroup_(copy.deepcopy(twin), x, neurons=Net.NEURONS)  # deterministic: a grouped network stays
    assert not again.orders


def test_apply_to_a_model_missing_a_tensor_changes_nothing():
    net, x = dyadic_net(4, 3, 12, 7, 2), example(4, 3)
    result = nwp.regroup_(copy.deepcopy(net), x, spec=nwp.H1V2, neurons=Net.NEURONS)
    other = Net(3, 12, 7, 2)
    other.encode = nn.Linear(3, 12, bias=False)
    before = snapshot(other)
    with pytest.raises(KeyError, match="encode.bias"):
        result.apply_(other)
    assert_same_snapshot(before, snapshot(other))


def test_a_bad_optimizer_is_refused_naming_it():
    net, x = dyadic_net(0, 3, 12, 7, 2), example(0, 3)
    with pytest.raises(TypeError, match="optimizer must be a torch optimizer"):
        nwp.regroup_(net, x, "adam", neurons=Net.NEURONS)


# --- what it must not follow blindly ------------------------------------------------------------------


class DecayLIF(LIF):
    """A neuron with a learnt decay per neuron, close to its start (near-uniform values)."""

    def __init__(self, n):
        super().__init__()
        self.decay = nn.Parameter(0.75 + torch.arange(n) % 3 / 1024)

    def forward(self, current, membrane):
        membrane = self.decay * membrane + current
        spikes = (membrane > 1.0).to(current.dtype)
        return spikes, membrane - spikes


def test_a_per_neuron_tensor_moves_and_a_plan_that_misses_it_is_caught_however_close_its_values(monkeypatch):
    net, x = dyadic_net(6, 3, 12, 7, 2), example(6, 3)
    net.lif = DecayLIF(12)
    decay = net.lif.decay.detach().clone()
    result = copy.deepcopy(net)
    found = nwp.regroup_(result, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert same_bits(result.lif.decay, decay[found.orders["lif"]])
    plan = regroup_module._plan

    def missing_the_decay(model, traced, p, front):
        planned = plan(model, traced, p, front)
        return planned if isinstance(planned, str) else (tuple(m for m in planned[0] if m[0] != "lif.decay"), planned[1])

    monkeypatch.setattr(regroup_module, "_plan", missing_the_decay)
    kept = nwp.regroup_(net, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert "lif" not in kept.orders and "computes otherwise" in kept.kept["lif"]
    assert same_bits(net.lif.decay, decay)


def test_one_neuron_module_with_per_neuron_tensors_for_two_populations_keeps_their_order():
    net, x = dyadic_net(7, 3, 12, 12, 2), example(7, 3)
    net.lif = net.lif2 = DecayLIF(12)  # one module, two layers of 12
    result = nwp.regroup_(net, x, spec=nwp.H1V2, neurons=("front", "lif", "out"))
    assert not result.orders and any("serves several populations" in why for why in result.kept.values())


def test_a_weight_parametrized_with_a_tensor_of_its_own_keeps_the_order():
    class Masked(nn.Module):
        def __init__(self, shape):
            super().__init__()
            self.register_buffer("mask", (torch.arange(shape[0] * shape[1]).view(shape) % 3 != 0).float())

        def forward(self, w):
            return w * self.mask

    net, x = dyadic_net(8, 3, 12, 7, 2), example(8, 3)
    torch.nn.utils.parametrize.register_parametrization(net.encode, "weight", Masked((12, 3)))
    before = copy.deepcopy(net.state_dict())
    result = nwp.regroup_(net, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert "lif" not in result.orders and "a tensor of its own" in result.kept["lif"]
    assert all(same_bits(before[k], net.state_dict()[k]) for k in before if k.startswith(("encode", "recurrent")))


def test_a_population_silent_on_the_example_keeps_its_order():
    net = dyadic_net(9, 3, 12, 7, 2)
    with torch.no_grad():
        for layer in (net.encode, net.link, net.readout):
            layer.bias.zero_()
    result = nwp.regroup_(net, torch.zeros(6, 4, 3), spec=nwp.H1V2, neurons=Net.NEURONS)
    assert not result.orders and "never spike" in result.kept["lif"]


def test_gradients_and_a_factored_optimizer_state_move_and_an_unreadable_state_is_refused_moving_nothing():
    net, x = dyadic_net(10, 3, 12, 7, 2), example(10, 3)
    optimizer = torch.optim.Adafactor(net.parameters())
    sum((p * torch.randn_like(p)).sum() for p in net.parameters()).backward()
    optimizer.step()
    grads = {name: p.grad.clone() for name, p in net.named_parameters()}
    rows = optimizer.state[net.encode.weight]["row_var"].clone()  # (12, 1): reduced over the columns
    columns = optimizer.state[net.readout.weight]["col_var"].clone()  # (1, 7)
    twin = copy.deepcopy(net)
    result = nwp.regroup_(net, x, optimizer, spec=nwp.H1V2, neurons=Net.NEURONS)
    p, q = result.orders["lif"], result.orders.get("lif2", torch.arange(7))
    assert same_bits(net.encode.weight.grad, grads["encode.weight"][p])
    assert same_bits(optimizer.state[net.encode.weight]["row_var"], rows[p])
    assert same_bits(optimizer.state[net.readout.weight]["col_var"], columns[:, q])
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.1)
    twin_optimizer.state[twin.encode.weight]["odd"] = torch.zeros(5)  # a state it cannot read
    before = snapshot(twin)
    with pytest.raises(ValueError, match="optimizer's state for encode.weight has shape .5,.*nothing was moved"):
        result.apply_(twin, twin_optimizer)
    assert_same_snapshot(before, snapshot(twin))


def test_apply_skips_a_state_a_copy_has_not_made_yet_and_refuses_a_wrong_shape_moving_nothing():
    net, x = dyadic_net(11, 3, 12, 7, 2), example(11, 3)
    net.lif.register_buffer("membrane", torch.zeros(4, 12))  # a state of the last forward, per neuron
    fresh = copy.deepcopy(net)
    fresh.lif.membrane = torch.zeros(0)  # a copy that never ran
    result = nwp.regroup_(net, x, spec=nwp.H1V2, neurons=Net.NEURONS)
    assert ("lif.membrane", (1,)) in result.moves["lif"]
    result.apply_(fresh)
    assert same_bits(fresh.encode.weight, net.encode.weight)
    wrong = copy.deepcopy(net)
    wrong.lif.membrane = torch.zeros(4, 11)
    before = snapshot(wrong)
    with pytest.raises(ValueError, match="lif.membrane has shape .4, 11., not 12 neurons.*nothing was moved"):
        result.apply_(wrong)
    assert_same_snapshot(before, snapshot(wrong))


def test_populations_whose_reorders_each_pass_but_not_together_are_all_kept(monkeypatch):
    net, x = dyadic_net(12, 3, 12, 7, 2), example(12, 3)
    check = regroup_module._computes_alike

    def alone_only(model, ex, planned, neurons):
        return len(planned) == 1 and check(model, ex, planned, neurons)

    monkeypatch.setattr(regroup_module, "_computes_alike", alone_only)
    assert_all_kept_and_nothing_moved(net, x, "together")


def test_apply_refuses_a_bad_optimizer_naming_it():
    net, x = dyadic_net(0, 3, 12, 7, 2), example(0, 3)
    result = nwp.regroup_(copy.deepcopy(net), x, spec=nwp.H1V2, neurons=Net.NEURONS)
    with pytest.raises(TypeError, match="Regrouping.apply_: optimizer must be a torch optimizer"):
        result.apply_(net, "adam")
