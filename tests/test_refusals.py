"""A refusal changes nothing: every tensor of the state_dict (buffers included), every
``module.weight``, every module's class, the outputs and the hardness are as they were."""

import threading

import pytest
import torch
from layers import assert_same_snapshot, cloned_state, same_bits, scaled, snapshot
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import nwave_param as nwp
from nwave_param import description
from nwave_param.core.settings import Registration
from nwave_param.layout import Layout


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 7)
        self.norm = nn.BatchNorm1d(7)  # buffers too
        self.lstm = nn.LSTM(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: (time, batch, 4)
        hidden = self.norm(self.fc(x).transpose(1, 2)).transpose(1, 2)
        out, _ = self.lstm(torch.tanh(hidden))
        return self.head(out)


X = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(1))


def everything(model):
    """The whole state_dict, each parametrized tensor as the module computes it, the classes,
    the outputs and the hardness."""
    computed = [
        getattr(module, name).detach().clone()
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for name in module.parametrizations
    ]
    with torch.no_grad():
        out = model.eval()(X)
    return snapshot(model), computed, out, nwp.registry_of(model).hardness


def assert_unchanged(before, after):
    (snapshot_a, computed_a, out_a, h_a), (snapshot_b, computed_b, out_b, h_b) = before, after
    assert_same_snapshot(snapshot_a, snapshot_b)
    assert len(computed_a) == len(computed_b) and all(same_bits(a, b) for a, b in zip(computed_a, computed_b))
    assert same_bits(out_a, out_b) and h_a == h_b


def registered(hardness=0.25, seed=0):
    torch.manual_seed(seed)
    model = scaled(Net(), 3)
    nwp.register(model).harden(hardness)
    with torch.no_grad():
        model.train()(X)  # the BatchNorm's running statistics move away from their initial values
    return model


# --- load_state_dict ---------------------------------------------------------------------------

DESCRIPTIONS = [
    "fc.parametrizations.weight.0._extra_state",
    "lstm.parametrizations.weight_hh_l0.0._extra_state",
    "head.parametrizations.weight.0._extra_state",
]


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("bad", DESCRIPTIONS)
def test_a_refused_load_changes_nothing(strict, bad):
    model, checkpoint = registered(), registered(hardness=0.75, seed=1).state_dict()
    layout = Layout(gates=4) if "lstm" in bad else Layout()
    checkpoint[bad] = description.encode(layout, nwp.ChipSpec(limit=0.5), 0.75)
    before = everything(model)
    name = bad.replace(".parametrizations", "").removesuffix(".0._extra_state")
    with pytest.raises(ValueError, match=rf"{name}.*limit=0\.5.*nothing was loaded"):
        model.load_state_dict(checkpoint, strict=strict)
    assert_unchanged(before, everything(model))


def test_a_refused_load_of_an_unreadable_description_changes_nothing():
    model, checkpoint = registered(), registered(hardness=0.75, seed=1).state_dict()
    checkpoint[DESCRIPTIONS[-1]] = checkpoint[DESCRIPTIONS[-1]].half()  # 16-bit words do not survive half precision
    before = everything(model)
    with pytest.raises(ValueError, match=r"head\.weight.*cannot be read"):
        model.load_state_dict(checkpoint)
    assert_unchanged(before, everything(model))


def test_a_checkpoint_whose_weights_disagree_on_the_hardness_is_refused():
    model, checkpoint = registered(), registered(hardness=0.75, seed=1).state_dict()
    checkpoint[DESCRIPTIONS[-1]] = description.encode(Layout(), nwp.ChipSpec(), 0.5)
    before = everything(model)
    with pytest.raises(ValueError, match=r"fc\.weight and head\.weight were saved at hardness 0\.75 and 0\.5"):
        model.load_state_dict(checkpoint)
    assert_unchanged(before, everything(model))


def test_loading_into_a_submodule_checks_and_restores_alike():
    model, source = registered(), registered(hardness=0.75, seed=1)
    with pytest.warns(UserWarning, match="hardness 0.75"):
        model.head.load_state_dict(source.head.state_dict())
    assert nwp.registry_of(model).hardness == 0.75 and torch.equal(model.head.weight, source.head.weight)
    bad = source.head.state_dict()
    bad["parametrizations.weight.0._extra_state"] = description.encode(Layout(), nwp.ChipSpec(group_size=3), 0.75)
    before = everything(model)
    with pytest.raises(ValueError, match="group_size=3"):
        model.head.load_state_dict(bad)
    assert_unchanged(before, everything(model))


class Parts(nn.Module):
    """A parent holding plain modules and separately registered parts, in this order:
    a plain ``head``, registered ``a`` and ``b``, a plain ``tail``."""

    def __init__(self):
        super().__init__()
        self.head, self.a, self.b, self.tail = nn.Linear(4, 5), Net(), Net(), nn.Linear(3, 2)


def parts(seed, spec_of_b=nwp.H1V1):
    torch.manual_seed(seed)
    model = scaled(Parts(), 3)
    nwp.register(model.a).harden(0.25)
    nwp.register(model.b, spec_of_b).harden(0.25)
    return model


def test_a_refused_load_into_separately_registered_parts_changes_no_registered_part():
    """``b``'s description does not fit: refused before ``a`` (registered apart) loads anything."""
    model, checkpoint = parts(0, nwp.ChipSpec(limit=0.5)), parts(1).state_dict()
    before = cloned_state(model)
    with pytest.raises(
        ValueError, match=r"b\.fc\.weight.*limit=0\.5.*nothing registered was loaded; torch has already copied head\.weight, head\.bias, "
    ):
        model.load_state_dict(checkpoint)
    changed = [k for (k, old), (_, new) in zip(before.items(), model.state_dict().items()) if not same_bits(old, new)]
    assert changed == ["head.weight", "head.bias"]  # the plain module torch loads first: named above
    assert all(nwp.registry_of(part).hardness == 0.25 for part in (model.a, model.b))


def test_a_refused_load_into_a_registered_part_before_its_plain_siblings_changes_nothing():
    """A LightningModule holding a registered net before its plain head: the head is not reached."""
    model, checkpoint = parts(0), parts(1).state_dict()
    del model.head
    checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith("head.")}
    checkpoint["a.head.parametrizations.weight.0._extra_state"] = checkpoint["a.head.parametrizations.weight.0._extra_state"].half()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"a\.head\.weight.*cannot be read.*nothing registered was loaded$"):
        model.load_state_dict(checkpoint)
    assert_same_snapshot(before, snapshot(model))


# --- project_ ----------------------------------------------------------------------------------


def test_a_refused_projection_through_orthogonal_restores_its_buffers_the_weights_and_the_outputs():
    torch.manual_seed(0)
    model = Net()
    model.head = nn.Linear(6, 6)
    parametrizations.orthogonal(model.head)
    model.head.parametrizations.weight[0].base.mul_(1)  # a buffer orthogonal's right_inverse replaces
    scaled(model.fc, 3)
    reg = nwp.register(model, nwp.ChipSpec(limit=0.5, group_size=3)).harden(0.5)
    assert "head.parametrizations.weight.0.base" in model.state_dict()
    before = everything(model)
    with pytest.raises(ValueError, match=r"head\.weight.*cannot hold.*restored"):
        reg.project_()
    assert_unchanged(before, everything(model))


def test_a_refused_projection_through_weight_norm_restores_everything():
    torch.manual_seed(0)
    model = Net()
    parametrizations.weight_norm(model.head)
    with torch.no_grad():  # per block of 5 rows: 4 positive, 1 negative; the projection zeroes a whole row
        model.head.parametrizations.weight.original1.copy_(torch.tensor([[0.5] * 6] * 2 + [[-0.5] * 6]))
    scaled(model.fc, 9)
    reg = nwp.register(model, nwp.ChipSpec(group_size=3)).harden(0.5)
    before = everything(model)
    with pytest.raises(ValueError, match=r"head\.weight.*NaN"):
        reg.project_()
    assert_unchanged(before, everything(model))


# --- register ----------------------------------------------------------------------------------


def test_a_parameter_tied_between_layouts_is_refused_at_register_naming_both_holders():
    model = nn.ModuleDict({"linear": nn.Linear(4, 9), "cell": nn.GRUCell(4, 3)})
    model["cell"].weight_ih = model["linear"].weight  # (9, 4): a Linear's rows, and a GRUCell's 3 gates
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"linear\.weight and cell\.weight_ih hold one Parameter.*gates=3"):
        nwp.register(model)
    assert_same_snapshot(before, snapshot(model))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(m._load_state_dict_pre_hooks for m in model.modules())


def _assert_register_refused(model, match):
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        nwp.register(model)
    assert_same_snapshot(before, snapshot(model))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(m._load_state_dict_pre_hooks for m in model.modules())


@pytest.mark.parametrize("second", ["rows 4..9", "the transpose", "every other row"])
def test_parameters_over_overlapping_memory_are_refused_at_register_naming_both(second):
    base = torch.randn(10, 10) * 3
    view = {"rows 4..9": base[4:], "the transpose": base.t(), "every other row": base[1::2]}[second]
    model = nn.ModuleDict({"a": nn.Linear(10, 6, bias=False), "b": nn.Linear(10, view.shape[0], bias=False)})
    model["a"].weight, model["b"].weight = nn.Parameter(base[:6]), nn.Parameter(view)
    _assert_register_refused(model, r"a\.weight and b\.weight are different Parameters over overlapping memory")


def test_parameters_that_share_a_storage_without_overlapping_register():
    """cuDNN flattens an RNN's weights into one storage: slices of it, side by side; and two
    interleaved views share a storage without sharing an element."""
    lstm = nn.LSTM(3, 5)
    flat = torch.randn(sum(p.numel() for p in lstm.parameters()))
    start = 0
    for name, p in list(lstm.named_parameters()):
        setattr(lstm, name, nn.Parameter(flat[start : start + p.numel()].view_as(p)))
        start += p.numel()
    base = torch.randn(6, 20)
    pair = nn.ModuleDict({"even": nn.Linear(10, 6, bias=False), "odd": nn.Linear(10, 6, bias=False)})
    pair["even"].weight, pair["odd"].weight = nn.Parameter(base[:, ::2]), nn.Parameter(base[:, 1::2])
    model = nn.ModuleDict({"lstm": lstm, "pair": pair})
    reg = nwp.register(model)
    assert reg.names == ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "pair.even.weight", "pair.odd.weight"]
    reg.project_()
    assert reg.is_mappable()


def test_an_expanded_parameter_is_refused_at_register():
    layer = nn.Linear(4, 5)
    layer.weight = nn.Parameter(torch.randn(1, 4).expand(5, 4))
    _assert_register_refused(layer, r"weight is an expanded tensor .* one value per synapse")


# --- on_chip and harden, seen from several threads ---------------------------------------------


def test_an_on_chip_context_opened_in_another_thread_is_refused_and_the_first_restores_the_model():
    model = registered(hardness=0.0)
    reg = nwp.registry_of(model)
    latent = [w.detach().clone() for w in reg.latent_weights()]
    entered, leave, errors = threading.Event(), threading.Event(), []

    def first():
        with reg.on_chip(seed=0):
            entered.set()
            leave.wait()

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    try:
        assert entered.wait(timeout=60)
        on_chip = model.head.weight.detach().clone()
        try:
            with nwp.registry_of(model).on_chip(seed=1):
                errors.append("entered")
        except RuntimeError as error:
            errors.append(str(error))
        assert torch.equal(model.head.weight, on_chip)  # the refusal left the open chip as it was
    finally:
        leave.set()
        thread.join(timeout=60)
    assert len(errors) == 1 and "already on a chip" in errors[0]
    assert model.head.weight is reg.latent_weights()[-1]  # closed: the latent weights, the very Parameters
    assert all(torch.equal(a, b) for a, b in zip(latent, reg.latent_weights()))
    with reg.on_chip(seed=1):  # and a new chip opens
        pass


def test_harden_is_one_reference_swap_shared_by_every_constraint(monkeypatch):
    model = registered()
    constraints = [m for m in model.modules() if isinstance(m, nwp.ChipConstraint)]
    assert len(constraints) == 4 and len({id(c.registration) for c in constraints}) == 1
    assignments = []
    original = Registration.__setattr__
    monkeypatch.setattr(Registration, "__setattr__", lambda self, name, value: (assignments.append(name), original(self, name, value)))
    nwp.registry_of(model).harden(0.5)
    assert assignments == ["settings"]  # one assignment: a reader never sees the constraints disagree
    assert len({id(c.settings) for c in constraints}) == 1 and constraints[0].settings.hardness == 0.5
