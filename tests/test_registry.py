"""The registry's lifecycle: register -> train -> remove, state dicts, rebuilding, and bad input."""

import copy
import warnings

import pytest
import torch
from layers import assert_same_snapshot, scaled, snapshot
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import nwave_param as nwp
from nwave_param.loss import topology_loss, weight_magnitude_loss


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 7)
        self.norm = nn.LayerNorm(7)
        self.lstm = nn.LSTM(7, 6, num_layers=2, proj_size=3)
        self.emb = nn.Embedding(4, 6)
        self.readout = nn.Linear(3, 2)

    def forward(self, x):
        out, _ = self.lstm(self.norm(self.fc(x)))
        return self.readout(out)


# --- prepare -------------------------------------------------------------------------------


def test_register_tracks_weights_in_named_parameters_order():
    model = Net()
    reg = nwp.register(model)
    expected = [
        n for n, p in Net().named_parameters() if p.dim() >= 2 and not n.startswith(("emb", "norm"))
    ]
    assert reg.names == expected
    assert reg.names[:2] == ["fc.weight", "lstm.weight_ih_l0"]
    assert "lstm.weight_hr_l1" in reg.names


def test_register_keeps_outputs_and_parameters_identical():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(5, 3, 6)
    before = model(x)
    params = {id(p) for p in model.parameters()}
    nwp.register(model)
    assert torch.equal(model(x), before)
    assert {id(p) for p in model.parameters()} == params  # optimizers need no update
    assert model.fc.weight is model.fc.parametrizations.weight.original


def test_in_place_init_reaches_registered_weight():
    model = nn.Linear(4, 5)
    nwp.register(model)
    nn.init.constant_(model.weight, 0.25)
    assert torch.all(model.parametrizations.weight.original == 0.25)


def test_exclude_globs():
    model = Net()
    reg = nwp.register(model, exclude=["readout.*", "lstm.*_l1"])
    assert "readout.weight" not in reg.names and "lstm.weight_hh_l1" not in reg.names
    assert "lstm.weight_hh_l0" in reg.names
    assert not parametrize.is_parametrized(model.readout)


def test_exclude_pattern_matching_nothing_warns_and_everything_raises():
    with pytest.warns(UserWarning, match="'nothing.*'"):
        nwp.register(nn.Linear(3, 3), exclude="nothing.*")
    model = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="excludes every"):
        nwp.register(model, exclude="*")
    assert not parametrize.is_parametrized(model)


def test_tied_weight_is_tracked_once():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    reg = nwp.register(model)
    assert reg.names == ["0.weight"]
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    assert torch.allclose(reg.penalty_terms().magnitude, torch.tensor(0.1**2))


def test_weight_with_existing_parametrization_is_tracked_by_effective_value():
    model = nn.Sequential(nn.Linear(3, 4))
    parametrizations.weight_norm(model[0])
    before = model[0].weight.detach().clone()
    keys, cls = list(model.state_dict()), type(model[0])
    reg = nwp.register(model)
    assert reg.names == ["0.weight"]
    chain = model[0].parametrizations.weight
    assert isinstance(chain[-1], nwp.ChipConstraint) and len(chain) == 2
    expected = (before.abs() - 0.9).relu().square().sum() / before.numel()
    torch.testing.assert_close(reg.penalty_terms().magnitude, expected)
    reg.remove()
    assert list(model.state_dict()) == keys and len(model[0].parametrizations.weight) == 1
    assert type(model[0]) is cls  # weight_norm's own class is back


# --- train ---------------------------------------------------------------------------------


def test_penalty_is_scaled_sum_and_trains_toward_the_chip():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 10)), 8)
    reg = nwp.register(model, alpha=2.0, lam=0.5, power=1)
    p = reg.penalty_terms()
    torch.testing.assert_close(reg.penalty(), 2.0 * p.magnitude + 0.5 * p.topology)
    optimizer = torch.optim.SGD(model.parameters(), lr=20.0)
    start = reg.penalty().item()
    for _ in range(100):
        optimizer.zero_grad()
        reg.penalty().backward()
        optimizer.step()
    assert reg.penalty().item() < 0.2 * start


def test_functional_forms_equal_registry_exactly():
    torch.manual_seed(1)
    model = scaled(Net(), 3)
    plain_magnitude, plain_topology = weight_magnitude_loss(model), topology_loss(model, 0.3)
    reg = nwp.register(model, exclude="readout.*")
    assert torch.equal(weight_magnitude_loss(model), reg.penalty_terms().magnitude)
    assert torch.equal(topology_loss(model, 0.3), 0.3 * reg.penalty_terms().topology)
    reg.remove()
    reg = nwp.register(model)
    assert torch.equal(plain_magnitude, reg.penalty_terms().magnitude)
    assert torch.equal(plain_topology, 0.3 * reg.penalty_terms().topology)


def test_cached_evaluates_each_weight_once():
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    model = nn.Linear(3, 3)
    parametrize.register_parametrization(model, "weight", Counting())
    reg = nwp.register(model)
    calls.clear()
    with reg.cached():
        for _ in range(10):
            model(torch.randn(2, 3))
    assert len(calls) == 1


def test_penalty_of_half_precision_weights_accumulates_in_float32():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.mul_(100)
    p = nwp.register(model).penalty_terms()
    assert p.magnitude.dtype == torch.float32 and torch.isfinite(p.magnitude)


# --- state dicts and rebuilding ------------------------------------------------------------


def test_registered_state_dict_loads_into_fresh_registered_model():
    source = Net()
    nwp.register(source)
    target = Net()
    nwp.register(target)
    target.load_state_dict(source.state_dict())
    assert list(source.state_dict()) == list(target.state_dict())
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_plain_checkpoint_loads_into_registered_model():
    source = Net()
    target = Net()
    nwp.register(target)
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(target.fc.weight, source.fc.weight)
    assert torch.equal(target.lstm.weight_hr_l1, source.lstm.weight_hr_l1)


def test_load_state_dict_strictness_is_pytorchs():
    model = nn.Linear(3, 3)
    nwp.register(model)
    state = nn.Linear(3, 3).state_dict()
    del state["bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="bias"):
        model.load_state_dict(state)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == ["bias"] and result.unexpected_keys == ["extra"]


def test_registry_of_rebuilds_after_deepcopy():
    model = Net()
    reg = nwp.register(model, nwp.ChipSpec(limit=0.5, group_size=3), alpha=0.1, lam=2.0, power=1)
    clone = copy.deepcopy(model)
    rebuilt = nwp.registry_of(clone)
    assert rebuilt.names == reg.names
    assert (rebuilt.spec, rebuilt.alpha, rebuilt.lam, rebuilt.power) == (reg.spec, 0.1, 2.0, 1)
    assert torch.equal(rebuilt.penalty(), reg.penalty())
    rebuilt.remove()
    assert nwp.registry_of(model).names == reg.names  # the original is untouched
    plain = Net()
    assert clone.load_state_dict(plain.state_dict())  # hooks were removed with the constraints
    assert list(clone.state_dict()) == list(plain.state_dict())


def test_registry_of_plain_model_raises_lookup_error():
    with pytest.raises(LookupError, match="register"):
        nwp.registry_of(nn.Linear(2, 2))


# --- remove --------------------------------------------------------------------------------


def test_remove_restores_model_bit_for_bit():
    torch.manual_seed(0)
    model = Net()
    before = snapshot(model)
    hooks = dict(model.fc._load_state_dict_pre_hooks)
    reg = nwp.register(model)
    reg.remove()
    assert_same_snapshot(before, snapshot(model))
    assert dict(model.fc._load_state_dict_pre_hooks) == hooks
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_remove_twice_and_after_manual_removal_raise_without_change():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    reg = nwp.register(model)
    parametrize.remove_parametrizations(model[0], "weight", leave_parametrized=False)
    with pytest.raises(RuntimeError, match="0.weight"):
        reg.remove()
    assert parametrize.is_parametrized(model[1])
    nwp.registry_of(model).remove()
    assert not parametrize.is_parametrized(model[1])
    with pytest.raises(RuntimeError, match="removed"):
        reg.remove()


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [({"power": 3}, "power"), ({"alpha": -1.0}, "alpha"), ({"lam": float("nan")}, "lam")],
)
def test_register_rejects_bad_settings(kwargs, match):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        nwp.register(model, **kwargs)
    assert not parametrize.is_parametrized(model)


def test_model_without_trackable_weights_raises():
    with pytest.raises(ValueError, match="no trackable weight"):
        nwp.register(nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4), nn.ReLU()))


def test_registering_twice_names_weights_and_points_to_registry_of():
    model = nn.Sequential(nn.Linear(2, 2))
    nwp.register(model)
    with pytest.raises(nwp.AlreadyRegisteredError, match=r"0\.weight.*registry_of"):
        nwp.register(model)


def test_non_floating_weight_raises_type_error_naming_it():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].weight = nn.Parameter(torch.ones(2, 2, dtype=torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match=r"1\.weight"):
        nwp.register(model)
    assert not parametrize.is_parametrized(model[0])


def test_meta_and_lazy_weights_raise():
    with torch.device("meta"):
        meta = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="meta"):
        nwp.register(meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lazy modules warn that they are experimental
        lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match="forward pass"):
        nwp.register(lazy)


def test_weights_on_several_devices_raise():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with torch.device("meta"):
        model[1] = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="several devices"):
        nwp.register(model)
    assert not parametrize.is_parametrized(model[0])


def test_empty_weights_give_zero_penalties():
    model = nn.Linear(0, 4)
    p = nwp.register(model).penalty_terms()
    assert p.magnitude.item() == 0 and p.topology.item() == 0


def test_requires_grad_false_weight_is_tracked_without_gradient():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].weight.requires_grad_(False)
    with torch.no_grad():
        model[0].weight.fill_(2.0)
        model[1].weight.fill_(2.0)
    reg = nwp.register(model)
    assert reg.names == ["0.weight", "1.weight"]
    reg.penalty().backward()
    assert model[0].weight.grad is None and model[1].weight.grad is not None


def test_quantized_weight_raises_type_error_naming_it():
    model = nn.Sequential(nn.Linear(2, 2))
    packed = torch.quantize_per_tensor(torch.randn(3, 3), scale=0.1, zero_point=0, dtype=torch.qint8)
    model.register_parameter("q_weight", nn.Parameter(packed, requires_grad=False))
    with pytest.raises(TypeError, match="q_weight"):
        nwp.register(model)
    assert not parametrize.is_parametrized(model[0])


def test_cached_reads_the_parameter_directly_and_restores_everything():
    torch.manual_seed(0)
    model = Net()
    reg = nwp.register(model)
    injected = type(model.fc).__dict__["weight"]
    keys = set(vars(model.fc))
    x = torch.randn(5, 3, 6)
    expected = model(x)
    with reg.cached():
        assert model.fc.weight is model.fc.parametrizations.weight.original
        with nwp.registry_of(model).cached():  # nested, through another registry object
            assert torch.equal(model(x), expected)
        clone = copy.deepcopy(model)  # a copy made inside reads its own weights
        assert clone.fc.weight is clone.fc.parametrizations.weight.original
        assert clone.fc.weight is not model.fc.weight
    assert type(model.fc).__dict__["weight"] is injected and set(vars(model.fc)) == keys
    with pytest.raises(ZeroDivisionError), reg.cached():
        1 / 0
    assert type(model.fc).__dict__["weight"] is injected and set(vars(model.fc)) == keys
    reg.remove()
    assert list(model.state_dict()) == list(Net().state_dict())


@pytest.mark.parametrize("seed", range(5))
def test_project_through_weight_norm_and_refusal_for_one_way_chains(seed):
    torch.manual_seed(seed)
    model = scaled(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 12)), 5)
    parametrizations.weight_norm(model[1])
    reg = nwp.register(model)
    reg.project_()
    assert reg.is_mappable()  # weight_norm's forward rounds; the projection makes up for it
    assert reg.penalty_terms().magnitude.item() == 0 and reg.penalty_terms().topology.item() == 0

    class OneWay(nn.Module):
        def forward(self, x):
            return 2 * x

    other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    parametrize.register_parametrization(other[1], "weight", OneWay())
    reg = nwp.register(other)
    before = [w.detach().clone() for w in reg.latent_weights()]
    with pytest.raises(ValueError, match=r"1\.weight.*right_inverse"):
        reg.project_()
    assert all(torch.equal(a, b) for a, b in zip(before, reg.latent_weights()))


def test_cached_with_a_copy_made_before_the_context():
    model = nn.Sequential(nn.Linear(3, 4))
    reg = nwp.register(model)
    shadow = copy.deepcopy(model)  # shares the parametrized class
    x = torch.randn(2, 3)
    with reg.cached():
        assert torch.equal(shadow(x), model(x))


# --- one source of truth -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["spec", "alpha", "lam", "power", "hardness", "names"])
def test_settings_are_read_only_and_say_how_to_change_them(name):
    reg = nwp.register(nn.Linear(3, 3))
    before = (reg.spec, reg.alpha, reg.lam, reg.power, reg.hardness)
    with pytest.raises(AttributeError, match=f"{name} is read-only: .*(register|penalty|harden|model)"):
        setattr(reg, name, 10)
    assert (reg.spec, reg.alpha, reg.lam, reg.power, reg.hardness) == before


def test_registries_of_one_model_share_the_settings():
    model = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2))
    reg = nwp.register(model, nwp.ChipSpec(limit=0.5, group_size=2), alpha=2.0, lam=3.0, power=1)
    other = nwp.registry_of(model)
    other.harden(0.25)
    assert reg.hardness == 0.25 and reg.settings is other.settings
    assert (other.spec, other.alpha, other.lam, other.power) == (nwp.ChipSpec(0.5, 2), 2.0, 3.0, 1)
    torch.testing.assert_close(other.penalty(), reg.penalty())


def test_penalty_overrides_alpha_and_lam_for_one_call():
    torch.manual_seed(0)
    model = nn.Linear(6, 7)
    with torch.no_grad():
        model.weight.mul_(5)
    reg = nwp.register(model, alpha=1.0, lam=1.0)
    p = reg.penalty_terms()
    torch.testing.assert_close(reg.penalty(alpha=3.0), 3.0 * p.magnitude + p.topology)
    torch.testing.assert_close(reg.penalty(lam=0.5), p.magnitude + 0.5 * p.topology)
    torch.testing.assert_close(reg.penalty(alpha=0.0, lam=2.0), 2.0 * p.topology)
    assert (reg.alpha, reg.lam) == (1.0, 1.0)
    for bad in (-1.0, float("nan"), True, "2"):
        with pytest.raises(ValueError, match="alpha"):
            reg.penalty(alpha=bad)


def test_names_are_relative_to_the_model_the_registry_is_read_from():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reg = nwp.register(model)
    wrapper = nn.Sequential(nn.Identity(), model)
    assert reg.names == ["0.weight", "1.weight"]
    assert nwp.registry_of(wrapper).names == ["1.0.weight", "1.1.weight"]
    assert nwp.registry_of(model[1]).names == ["weight"]


def test_registry_of_a_parent_of_separately_registered_parts():
    parent = nn.ModuleDict({"encoder": nn.Linear(3, 5), "decoder": nn.Linear(5, 3)})
    nwp.register(parent["encoder"])
    nwp.register(parent["decoder"])
    reg = nwp.registry_of(parent)
    assert reg.names == ["encoder.weight", "decoder.weight"]
    reg.harden(0.5)
    assert nwp.registry_of(parent["encoder"]).hardness == nwp.registry_of(parent["decoder"]).hardness == 0.5

    mixed = nn.ModuleDict({"encoder": nn.Linear(3, 5), "decoder": nn.Linear(5, 3)})
    nwp.register(mixed["encoder"])
    nwp.register(mixed["decoder"], alpha=2.0)
    with pytest.raises(ValueError, match=r"encoder\.weight and decoder\.weight .*different settings"):
        nwp.registry_of(mixed)


def test_functional_forms_compute_with_the_arguments_given():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)), 3)
    spec = nwp.ChipSpec(limit=0.5, group_size=2)
    reg = nwp.register(model, spec, power=1)
    p = reg.penalty_terms()
    assert torch.equal(weight_magnitude_loss(model, limit=0.5, power=1), p.magnitude)
    assert torch.equal(topology_loss(model, lam=0.3, group_size=2), 0.3 * p.topology)
    # other arguments, other numbers: the defaults are not the registry's
    weights = [m.weight.detach() for m in model]
    count = sum(w.numel() for w in weights)
    magnitude = sum((w.abs() - 0.9).relu().square().sum() for w in weights) / count
    torch.testing.assert_close(weight_magnitude_loss(model), magnitude)
    topology = sum(
        torch.minimum(w[i : i + 5].relu().sum(0), (-w[i : i + 5]).relu().sum(0)).sum()
        for w in weights
        for i in range(0, w.shape[0], 5)
    ) / count
    torch.testing.assert_close(topology_loss(model), topology)


# --- nothing lost ----------------------------------------------------------------------------


def test_remove_inside_cached_works_and_torch_classes_stay_untouched():
    linear_attributes = dict(vars(nn.Linear))
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reg = nwp.register(model)
    x = torch.randn(2, 3)
    expected = model(x)
    with reg.cached():
        model(x)
        reg.remove()
        assert torch.equal(model(x), expected)
    assert torch.equal(model(x), expected)
    assert dict(vars(nn.Linear)) == linear_attributes
    assert type(model[0]) is nn.Linear
    other = nn.Linear(2, 2)
    parametrizations.weight_norm(other)  # torch's own parametrizations still register on a Linear
    nwp.register(nn.Linear(2, 2)).penalty()


# --- squash: one line --------------------------------------------------------------------------


def test_remove_leave_projected_squashes_in_one_call():
    torch.manual_seed(0)
    model = scaled(Net(), 3)
    reg = nwp.register(model).harden(1.0)
    x = torch.randn(4, 2, 6)
    with torch.no_grad():
        on_chip = model.eval()(x)
    lstm_names = ("weight_ih_l0", "weight_hh_l0", "weight_hr_l0", "weight_ih_l1", "weight_hh_l1", "weight_hr_l1")
    weights = [model.fc.weight, *(getattr(model.lstm, n) for n in lstm_names), model.readout.weight]
    chip_values = {name: w.detach().clone() for name, w in zip(reg.names, weights)}
    reg.remove(leave_projected=True)
    assert not any(parametrize.is_parametrized(m) for m in model.modules()) and type(model.fc) is nn.Linear
    for name, value in chip_values.items():
        assert torch.equal(model.get_parameter(name), value), name  # plain Parameters holding what the chip holds
    with torch.no_grad():
        assert torch.equal(model(x), on_chip)  # the plain model computes what the hardened one did


def test_remove_leave_projected_refused_removes_nothing():
    model = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    reg = nwp.register(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"1\.weight holds NaN"):
        reg.remove(leave_projected=True)
    assert_same_snapshot(before, snapshot(model))
    assert parametrize.is_parametrized(model[0]) and nwp.registry_of(model).names == ["0.weight", "1.weight"]


def test_the_renamed_names_still_work_for_a_release_and_say_the_new_ones():
    for old, new in (("Penalties", "PenaltyTerms"), ("LayerReport", "WeightReport"), ("Settings", "RegistrationSettings")):
        with pytest.warns(DeprecationWarning, match=new):
            assert getattr(nwp, old) is getattr(nwp, new)
        assert old not in nwp.__all__ and new in nwp.__all__
    with pytest.warns(DeprecationWarning, match="PenaltyTerms"):
        from nwave_param.functional import Penalties
    assert Penalties is nwp.PenaltyTerms
    model = nn.Linear(3, 5)
    reg = nwp.register(model)
    with pytest.warns(DeprecationWarning, match=r"nwp\.registry_of\(model\)"):
        assert nwp.Registry(model).names == nwp.registry_of(model).names == reg.names
    assert isinstance(reg.penalty_terms(), nwp.PenaltyTerms) and isinstance(reg.report()[0], nwp.WeightReport)
    assert isinstance(reg.settings, nwp.RegistrationSettings)


def test_the_aliases_deprecated_in_0_3_are_gone():
    reg = nwp.register(nn.Linear(3, 5))
    assert not hasattr(reg, "weights") and not hasattr(reg, "penalties")
