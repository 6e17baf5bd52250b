"""Hardness: the network computes with w + h (chip(w) - w), with a straight-through gradient.

At h = 0 a weight is the latent Parameter itself; at h = 1 it is, bit for bit, what
``reg.project_()`` writes (with or without a grid); in between it moves on the segment, and
without a grid its violations never grow.
"""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layers import KINDS, fill, group_sizes, limits, make_model, model_cfgs, powers, same_bits, scaled, values_cfgs
from reference import ref_sums, ref_tracked
from torch import nn
from torch.nn.utils import parametrizations

import nwave_param as nwp
from nwave_param import functional
from nwave_param._engine import hardening

hardnesses = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0.0, 1.0))


def setup(data, kind, vcfg, limit):
    model = make_model(data.draw(model_cfgs(kind), label="cfg"))
    fill(model, vcfg, limit)
    return model, ref_tracked(model)  # (name, module, local): modules stay the same after registering


def weight(module, local):
    return getattr(module, local)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=8)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, h=hardnesses, grid=st.sampled_from([None, 3, 5]))
def test_endpoints_and_the_segment_between(kind, data, vcfg, limit, group_size, h, grid):
    model, tracked = setup(data, kind, vcfg, limit)
    spec = nwp.ChipSpec(limit=limit, group_size=group_size, bits=grid)
    reg = nwp.register(model, spec)
    for _, module, local in tracked:  # h = 0: the Parameter itself, the same object
        assert weight(module, local) is module.parametrizations[local].original
    latents = [weight(m, local).detach().clone() for _, m, local in tracked]
    chip_model = copy.deepcopy(model)
    nwp.registry_of(chip_model).project_()
    chips = [weight(chip_model.get_submodule(name.rpartition(".")[0]), local).detach() for name, _, local in tracked]

    reg.harden(1.0)
    for (_, module, local), chip in zip(tracked, chips):
        assert same_bits(weight(module, local), chip)  # exactly what project_ writes
    reg.harden(h)
    for (_, module, local), latent, chip in zip(tracked, latents, chips):
        expected = latent if h == 0 else chip if h == 1 else latent + h * (chip - latent)
        assert same_bits(weight(module, local), expected)
    assert all(torch.equal(a, b) for a, b in zip(latents, reg.latent_weights()))  # the latent weights stay


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, h=hardnesses, seed=st.integers(0, 2**16))
def test_gradient_passes_straight_through(kind, data, vcfg, limit, group_size, h, seed):
    model, tracked = setup(data, kind, vcfg, limit)
    nwp.register(model, nwp.ChipSpec(limit=limit, group_size=group_size)).harden(h)
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.randn(weight(m, local).shape, generator=generator, dtype=torch.float64) for _, m, local in tracked]
    sum((c * weight(m, local)).sum() for c, (_, m, local) in zip(factors, tracked)).backward()
    for c, (_, module, local) in zip(factors, tracked):
        assert torch.equal(module.parametrizations[local].original.grad, c)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(
    data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, power=powers, hs=st.lists(hardnesses, min_size=2, max_size=4)
)
def test_violations_never_grow_with_hardness(kind, data, vcfg, limit, group_size, power, hs):
    # without a grid: with one, a kept entry rounded up to a level makes its side heavier
    model, tracked = setup(data, kind, vcfg, limit)
    reg = nwp.register(model, nwp.ChipSpec(limit=limit, group_size=group_size))
    previous = None
    with torch.no_grad():
        for h in sorted(hs):
            reg.harden(h)
            magnitude, topology, _ = ref_sums(tracked, limit, power, group_size)  # on the weights as computed
            if previous is not None:
                assert magnitude <= previous[0] and topology <= previous[1], (h, magnitude, topology, previous)
            previous = (magnitude, topology)
    assert previous == (0.0, 0.0) or sorted(hs)[-1] < 1  # at h = 1 there is nothing left


def test_project_at_full_hardness_changes_no_output():
    torch.manual_seed(0)
    model = scaled(nn.ModuleDict({"conv": nn.Conv1d(4, 6, 3, groups=2), "lstm": nn.LSTM(6, 7), "head": nn.Linear(7, 3)}), 4)

    def run(x):
        out, _ = model["lstm"](model["conv"](x).permute(2, 0, 1))
        return model["head"](out)

    reg = nwp.register(model).harden(1.0)
    x = torch.randn(5, 4, 9)
    with reg.cached():
        before = run(x)
    assert not reg.is_mappable()  # the latent weights are not the chip's...
    reg.project_()
    assert reg.is_mappable()  # ...until projected, which the outputs do not notice
    with reg.cached():
        assert torch.equal(run(x), before)


def test_training_on_the_chip_ends_mappable_with_nothing_lost_at_deployment():
    torch.manual_seed(0)
    x = torch.randn(256, 8)
    y = (x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).argmax(1)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 3))
    reg = nwp.register(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 300
    for step in range(steps):
        reg.harden(min(1.0, step / (steps / 2)))  # ramp over the first half, then hold at 1
        loss = nn.functional.cross_entropy(model(x), y) + reg.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        trained = (model(x).argmax(1) == y).float().mean().item()
        reg.project_()
        assert reg.is_mappable()
        on_chip = (model(x).argmax(1) == y).float().mean().item()
    assert trained == on_chip and trained > 0.8


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5", None, torch.tensor(0.5)])
def test_bad_hardness_is_refused_and_nothing_changes(bad):
    model = nn.Linear(3, 4)
    reg = nwp.register(model).harden(0.25)
    settings_before = reg.settings
    with pytest.raises((TypeError, ValueError), match="hardness"):
        reg.harden(bad)
    assert reg.settings is settings_before and reg.hardness == 0.25


def test_hardness_survives_copies_and_registry_of_and_is_restored_from_a_checkpoint():
    model = scaled(nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2)), 4)
    reg = nwp.register(model)
    keys = list(model.state_dict())
    weights = [model[i].parametrizations.weight.original.detach().clone() for i in range(2)]
    reg.harden(0.75)
    assert list(model.state_dict()) == keys  # the hardness travels in the descriptions, under the same keys
    assert all(torch.equal(model.state_dict()[f"{i}.parametrizations.weight.original"], weights[i]) for i in range(2))
    assert nwp.registry_of(model).hardness == 0.75 and nwp.registry_of(copy.deepcopy(model)).hardness == 0.75
    fresh = nn.Sequential(nn.Linear(3, 6), nn.Linear(6, 2))
    resumed = nwp.register(fresh)
    with pytest.warns(UserWarning, match=r"saved at hardness 0\.75.*registered at 0\.0") as caught:
        fresh.load_state_dict(model.state_dict())
    assert len(caught) == 1 and resumed.hardness == 0.75
    x = torch.randn(4, 3)
    assert torch.equal(fresh(x), model(x))  # the checkpoint computes what its model computed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alike: no warning
        fresh.load_state_dict(model.state_dict())


def test_remove_gives_back_the_latent_weights():
    model = nn.Linear(4, 6)
    with torch.no_grad():
        model.weight.mul_(5)
    latent = model.weight.detach().clone()
    reg = nwp.register(model).harden(1.0)
    assert not torch.equal(model.weight, latent)
    reg.remove()
    assert torch.equal(model.weight, latent)


def test_cached_computes_all_hardened_weights_together_once_per_pass(monkeypatch):
    model = nn.ModuleDict({"encode": nn.Linear(3, 5), "recurrent": nn.Linear(5, 5)})
    reg = nwp.register(model).harden(0.5)
    together, alone = [], []
    harden_all, harden = hardening.harden_all, functional.harden
    monkeypatch.setattr(hardening, "harden_all", lambda weights, *args: together.append(len(weights)) or harden_all(weights, *args))
    monkeypatch.setattr(functional, "harden", lambda *args: alone.append(1) or harden(*args))
    h = torch.zeros(2, 5)
    for _ in range(2):
        with reg.cached():
            for _ in range(8):
                h = torch.tanh(model["encode"](torch.ones(2, 3)) + model["recurrent"](h))
    assert together == [2, 2] and alone == []  # one engine call per pass for both weights, however often they are read
    model["recurrent"](h)
    assert together == [2, 2] and alone == [1]  # outside cached(), a weight computes alone


def test_tied_weights_harden_in_every_module_that_holds_them():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[2.0, -1.0, 0.5, 0.1]] * 2 + [[-0.3, 0.2, -0.4, 0.6]] * 2))
    reg = nwp.register(model).harden(1.0)
    assert reg.names == ["0.weight"] and len(reg.latent_weights()) == 1
    assert torch.equal(model[0].weight, model[1].weight)
    assert torch.equal(model[1].weight, functional.project(reg.latent_weights()[0].detach(), nwp.Layout(), reg.spec))
    reg.remove()
    assert model[1].weight is model[0].weight  # still tied


def test_existing_parametrizations_are_hardened_after_them():
    torch.manual_seed(0)
    model = nn.Linear(3, 7)
    parametrizations.weight_norm(model)
    with torch.no_grad():
        model.parametrizations.weight.original0.mul_(4)
    reg = nwp.register(model).harden(1.0)
    latent = reg.latent_weights()[0].detach()  # weight_norm's output
    assert torch.equal(model.weight, functional.project(latent, nwp.Layout(), reg.spec))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    torch.manual_seed(0)
    model = nn.Linear(6, 8).to(dtype)
    with torch.no_grad():
        model.weight.mul_(6)
    latent = model.weight.detach().clone()
    reg = nwp.register(model).harden(1.0)
    chip = functional.project(latent, nwp.Layout(), reg.spec)
    assert model.weight.dtype == dtype and torch.equal(model.weight, chip)
    assert bool((chip.float().abs() <= 0.9).all())
    reg.harden(0.5)
    assert torch.equal(model.weight, latent + 0.5 * (chip - latent))
    model(torch.randn(3, 6, dtype=dtype)).sum().backward()
    assert model.parametrizations.weight.original.grad.dtype == dtype


@pytest.mark.slow
def test_compiled_hardened_model_computes_as_eager():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 4)
    reg = nwp.register(model)
    compiled = torch.compile(model)
    x = torch.randn(16, 6)
    for h in (0.0, 0.5, 1.0, 0.3):  # register, harden, compile: and harden again later
        reg.harden(h)
        torch.testing.assert_close(compiled(x), model(x))
    eager_grads = torch.autograd.grad(model(x).sum(), reg.latent_weights())
    torch.testing.assert_close(torch.autograd.grad(compiled(x).sum(), reg.latent_weights()), eager_grads)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes, h=hardnesses, grid=st.sampled_from([None, 4]))
def test_inside_cached_every_weight_is_what_it_computes_alone(kind, data, vcfg, limit, group_size, h, grid):
    model, tracked = setup(data, kind, vcfg, limit)
    nwp.register(model, nwp.ChipSpec(limit=limit, group_size=group_size, bits=grid)).harden(h)
    alone = [weight(m, local).detach().clone() for _, m, local in tracked]
    with nwp.registry_of(model).cached():
        together = [weight(m, local).detach().clone() for _, m, local in tracked]
    assert all(same_bits(a, b) for a, b in zip(alone, together))
