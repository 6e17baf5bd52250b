"""Situations a real training run meets: compiled models on a chip, inference mode, mixed dtypes,
chains, constraints removed by hand, many shapes, threads, checkpoints from other settings."""

import copy
import threading
import warnings

import pytest
import torch
from layers import scaled
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import nwave_param as nwp
from nwave_param import functional
from nwave_param._engine import penalties, plans
from nwave_param.layout import Layout


@pytest.mark.slow
@pytest.mark.parametrize("spec", [nwp.H1V1, nwp.ChipSpec(bits=4), nwp.ChipSpec(mismatch=0.05)])
def test_a_compiled_model_computes_on_the_chip_inside_on_chip(spec):
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 4.0)
    reg = nwp.register(model, spec).harden(0.5)
    model.eval()
    compiled = torch.compile(model)
    x = torch.randn(4, 6)
    before = compiled(x)
    for seed in (1, 2):
        with reg.on_chip(seed):
            torch.testing.assert_close(compiled(x), model(x))
            assert not torch.equal(compiled(x), before)
    torch.testing.assert_close(compiled(x), before)  # and back again


@pytest.mark.slow
def test_a_hardened_model_compiles_in_one_graph():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 4.0)
    reg = nwp.register(model, nwp.ChipSpec(bits=5)).harden(0.5)
    x = torch.randn(4, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))  # no graph break
    # nwave_param's caches are for eager calls only
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message) and "nwave_param" in str(w.message)]
    reg.harden(1.0)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))


def test_a_first_call_under_inference_mode_leaves_training_working():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 300), nn.Linear(300, 400)), 4.0)  # packed and chunked
    reg = nwp.register(model)
    with torch.inference_mode():
        value = reg.penalty()
        mappable = reg.is_mappable()
    assert not mappable
    penalty = reg.penalty()
    penalty.backward()
    torch.testing.assert_close(penalty.detach(), value)
    assert all(w.grad is not None for w in reg.latent_weights())
    assert reg.report().totals["mixed_block_columns"] > 0


def test_mixed_dtypes_get_gradients_in_their_own_dtype_and_precision():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(8, 16).to(torch.bfloat16), nn.Linear(16, 4)), 4.0)
    reg = nwp.register(model)
    reg.penalty().backward()
    fp32 = reg.latent_weights()[1]
    assert reg.latent_weights()[0].grad.dtype == torch.bfloat16 and fp32.grad.dtype == torch.float32
    leaf = fp32.detach().clone().requires_grad_()
    magnitude, topology = functional.penalty_sums([reg.latent_weights()[0].detach(), leaf], reg.layouts, reg.spec, 2)
    count = sum(w.numel() for w in reg.latent_weights())
    ((magnitude + topology) / count).backward()
    torch.testing.assert_close(fp32.grad, leaf.grad)  # full float32 precision, not rounded to bf16


class Scale(nn.Module):
    def forward(self, x):
        return 0.5 * x

    def right_inverse(self, x):
        return 2 * x


def test_a_parametrization_registered_after_nwave_params():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3)), 4.0)
    reg = nwp.register(model)
    parametrize.register_parametrization(model[1], "weight", Scale())
    latent = model[1].parametrizations.weight.original
    assert reg.latent_weights()[1] is latent  # nwave_param's constraint still reads the Parameter
    reg.penalty().backward()
    assert reg.report().rows[1].numel == latent.numel()
    reg.project_()
    assert reg.is_mappable()
    with pytest.raises(ValueError, match=r"1\.weight.*after nwave_param"):
        nwp.plain_state_dict(model)


def test_load_state_dict_after_a_constraint_was_removed_by_hand():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    nwp.register(model)
    parametrize.remove_parametrizations(model[0], "weight", leave_parametrized=False)
    state = {k: v.clone() for k, v in nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)).state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    assert torch.equal(model[0].weight, state["0.weight"]) and torch.equal(model[1].weight, state["1.weight"])
    assert not result.unexpected_keys


def test_scratch_stays_bounded_over_many_shapes(monkeypatch):
    monkeypatch.setattr(plans, "_SMALL", 0)  # every weight chunked
    plans._plan.cache_clear()
    try:
        for rows in range(10, 50):
            penalties.penalty_sums([torch.randn(rows, 7)], [Layout()], nwp.H1V1, 2)
        assert len(plans._local.scratches) <= plans._SCRATCHES
    finally:
        plans._plan.cache_clear()


def test_threads_compute_what_one_thread_does():
    torch.manual_seed(0)
    models = [scaled(nn.Sequential(nn.Linear(20, 30), nn.Linear(30, 300), nn.Linear(300, 301)), 4.0) for _ in range(2)]
    registries = [nwp.register(m) for m in models]
    expected = []
    for reg in registries:
        penalty = reg.penalty()
        expected.append((penalty.detach(), [g.clone() for g in torch.autograd.grad(penalty, reg.latent_weights())]))
    results = [None, None]

    def work(k):
        for _ in range(20):
            penalty = registries[k].penalty()
            results[k] = (penalty.detach(), torch.autograd.grad(penalty, registries[k].latent_weights()))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (value, grads), (want, want_grads) in zip(results, expected):
        assert torch.equal(value, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_project_with_a_grid_through_weight_norm_says_why():
    torch.manual_seed(0)
    model = nn.Linear(10, 10)
    parametrizations.weight_norm(model)
    reg = nwp.register(model, nwp.ChipSpec(bits=5))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="off the 5-bit grid.*remove_parametrizations"):
        reg.project_()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_checkpoint_trained_with_mismatch_loads_for_evaluation_without_it():
    trained = nn.Linear(4, 5)
    nwp.register(trained, nwp.ChipSpec(bits=5, mismatch=0.02))
    evaluated = nn.Linear(4, 5)
    nwp.register(evaluated, nwp.ChipSpec(bits=5))
    evaluated.load_state_dict(trained.state_dict())
    assert torch.equal(evaluated.weight, trained.weight)
    other = nn.Linear(4, 5)
    nwp.register(other, nwp.ChipSpec(bits=4))
    with pytest.raises(ValueError, match="weight: the checkpoint was saved with"):
        other.load_state_dict(trained.state_dict())


def test_on_chip_draws_the_same_chip_for_a_seed_whatever_the_dtype():
    torch.manual_seed(0)
    model = scaled(nn.Linear(6, 8), 4.0)
    reg = nwp.register(model, nwp.ChipSpec(mismatch=0.05))
    with reg.on_chip(3):
        first = model.weight.detach().clone()
    half = copy.deepcopy(model).to(torch.bfloat16)
    with nwp.registry_of(half).on_chip(3):
        mismatch = half.weight.float() - functional.project(nwp.registry_of(half).latent_weights()[0].detach(), Layout(), reg.spec).float()
    reference = first - functional.project(reg.latent_weights()[0].detach(), Layout(), reg.spec)
    torch.testing.assert_close(mismatch, reference, rtol=0.02, atol=0.002)  # the same sample, held in bf16
