"""A deepcopy of a registered model is independent of its original, whatever either goes through.

PyTorch's parametrize gives a copy the class of its original, and keys ``parametrize.cached()``
by the module a property was made for; nwave_param gives each parametrized module a class of its
own, so removing, hardening or projecting one never touches the other.
"""

import copy

import pytest
import torch
from installs import not_installed
from layers import assert_same_snapshot, snapshot
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.optim.swa_utils import AveragedModel

import nwave_param as nwp


def make_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(4, 7), "lstm": nn.LSTM(7, 6), "head": nn.Linear(6, 3)})
    parametrizations.weight_norm(model["head"])  # a chain: nwave_param's constraint sits after weight_norm
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    return model


def run(model, x):
    out, _ = model["lstm"](torch.tanh(model["fc"](x)))
    return model["head"](out)


def observed(model, x):
    """The model's snapshot, its outputs and its hardness."""
    return (
        snapshot(model),
        run(model, x).detach(),
        nwp.registry_of(model).hardness if any(isinstance(m, nwp.ChipConstraint) for m in model.modules()) else None,
    )


def same(a, b):
    (snapshot_a, out_a, h_a), (snapshot_b, out_b, h_b) = a, b
    assert_same_snapshot(snapshot_a, snapshot_b)
    assert torch.equal(out_a, out_b) and h_a == h_b


def train_step(model):
    reg = nwp.registry_of(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(5, 2, 4)
    with reg.cached():
        loss = run(model, x).square().mean() + reg.penalty()
    loss.backward()
    optimizer.step()


STEPS = {
    "remove": lambda m: nwp.registry_of(m).remove(),
    "harden": lambda m: nwp.registry_of(m).harden(0.6),
    "project": lambda m: nwp.registry_of(m).project_(),
    "train": train_step,
    "load plain checkpoint": lambda m: m.load_state_dict(nwp.plain_state_dict(make_registered())),
    "remove and register again": lambda m: (nwp.registry_of(m).remove(), nwp.register(m, nwp.H1V2)),
}


def make_registered():
    model = make_model()
    nwp.register(model)
    return model


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("changed", ["copy", "original"])
def test_a_step_on_one_leaves_the_other_untouched(step, changed):
    original = make_registered()
    nwp.registry_of(original).harden(0.3)
    clone = copy.deepcopy(original)
    x = torch.randn(5, 2, 4)
    acted, watched = (clone, original) if changed == "copy" else (original, clone)
    before = observed(watched, x)
    STEPS[step](acted)
    same(before, observed(watched, x))
    # the watched one still goes through its whole lifecycle
    reg = nwp.registry_of(watched)
    assert reg.hardness == 0.3
    reg.penalty().backward()
    reg.project_()
    assert reg.is_mappable()
    reg.remove()
    assert not any(isinstance(m, nwp.ChipConstraint) for m in watched.modules())
    assert (type(watched["fc"]), type(watched["lstm"])) == (nn.Linear, nn.LSTM)
    assert parametrize.is_parametrized(watched["head"], "weight")  # weight_norm stays
    assert run(watched, x).shape == (5, 2, 3)


def test_copies_in_one_cached_context_read_their_own_weights():
    original = make_registered()
    clone = copy.deepcopy(original)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(-1)
    x = torch.randn(5, 2, 4)
    expected_original, expected_clone = run(original, x), run(clone, x)
    with nwp.registry_of(original).cached(), nwp.registry_of(clone).cached():
        assert torch.equal(run(clone, x), expected_clone)
        assert torch.equal(run(original, x), expected_original)
        inner = copy.deepcopy(original)  # made inside the context
        with torch.no_grad():
            inner["fc"].parametrizations.weight.original.zero_()
        assert not torch.equal(run(inner, x), expected_original)
        assert torch.equal(run(original, x), expected_original)


def test_a_copy_keeps_settings_and_hardness_as_its_own():
    original = make_model()
    nwp.register(original, nwp.ChipSpec(limit=0.5, group_size=3), alpha=2.0, lam=0.5, power=1).harden(0.4)
    clone = copy.deepcopy(original)
    reg = nwp.registry_of(clone)
    assert (reg.spec, reg.alpha, reg.lam, reg.power, reg.hardness) == (nwp.ChipSpec(0.5, 3), 2.0, 0.5, 1, 0.4)
    reg.harden(1.0)
    assert nwp.registry_of(original).hardness == 0.4


# --- copies of hardened recurrent layers, after a forward with gradients ---------------------


def _detach_snntorch_state(layer):
    """snnTorch's neurons keep their last state, with its graph, in buffers (``mem``, ``syn``)
    and attributes (SLSTM's ``spk``), which no deepcopy takes, with or without nwave_param:
    detached, as ``snntorch.utils.reset`` or ``reset_mem()`` does for most of them."""
    for slots in (layer._buffers, vars(layer)):
        for name, value in list(slots.items()):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                slots[name] = value.detach()


def _recurrent_layers():
    snn = pytest.importorskip("snntorch", reason=not_installed("snntorch"))

    def steps(layer, states, call):
        for _ in range(3):
            states = call(layer, states)
        return states[-1]

    yield "LSTM", lambda: nn.LSTM(3, 6, num_layers=2, proj_size=2), lambda m: m(torch.randn(4, 2, 3))[0]
    yield "GRU", lambda: nn.GRU(3, 6, bidirectional=True), lambda m: m(torch.randn(4, 2, 3))[0]
    yield "RNN", lambda: nn.RNN(3, 6), lambda m: m(torch.randn(4, 2, 3))[0]
    yield "LSTMCell", lambda: nn.LSTMCell(3, 6), lambda m: m(torch.randn(2, 3))[0]
    yield "GRUCell", lambda: nn.GRUCell(3, 6), lambda m: m(torch.randn(2, 3))
    yield (
        "snntorch RLeaky",
        lambda: snn.RLeaky(beta=0.9, linear_features=6),
        lambda m: steps(m, m.reset_mem(), lambda m, s: m(torch.randn(2, 6), *s)),
    )
    yield (
        "snntorch RSynaptic",
        lambda: snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=6),
        lambda m: steps(m, m.reset_mem(), lambda m, s: m(torch.randn(2, 6), *s)),
    )
    yield "snntorch SLSTM", lambda: snn.SLSTM(3, 6), lambda m: steps(m, m.reset_mem(), lambda m, s: m(torch.randn(2, 3), *s[-2:]))
    try:
        import norse.torch as norse
    except ImportError:
        return
    yield "norse LIFRecurrent", lambda: norse.LIFRecurrent(3, 6), lambda m: m(torch.randn(4, 2, 3))[0]
    yield "norse LIFRecurrentCell", lambda: norse.LIFRecurrentCell(3, 6), lambda m: m(torch.randn(2, 3))[0]


RECURRENT = list(_recurrent_layers())


@pytest.mark.parametrize("hardness", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("name, make, forward", RECURRENT, ids=[r[0] for r in RECURRENT])
def test_copies_of_a_hardened_recurrent_layer_after_a_forward_with_gradients(name, make, forward, hardness, tmp_path):
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(4)
    nwp.register(layer).harden(hardness)
    forward(layer).sum().backward()
    if name.startswith("snntorch"):
        _detach_snntorch_state(layer)
    clone, average = copy.deepcopy(layer), AveragedModel(layer)
    torch.save(copy.deepcopy(layer).state_dict(), tmp_path / "copy.pt")
    assert nwp.registry_of(clone).hardness == hardness == nwp.registry_of(average.module).hardness
    for copied in (clone, average.module):
        for (key, a), (_, b) in zip(layer.state_dict().items(), copied.state_dict().items(), strict=True):
            assert torch.equal(a, b), key
        torch.manual_seed(1)
        expected = forward(layer)
        torch.manual_seed(1)
        assert torch.equal(forward(copied), expected)  # the copy computes alike, gradients included
        forward(copied).sum().backward()
