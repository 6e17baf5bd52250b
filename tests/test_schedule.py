"""nwp.Schedule: the recipe's hardness, penalty scale and learning rate at every step, in a plain
loop and as a Lightning callback."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from installs import not_installed
from layers import same_bits, scaled
from torch import nn

import nwave_param as nwp


def registered():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(4, 10), nn.Tanh(), nn.Linear(10, 3)), 3)
    return model, nwp.register(model, nwp.H1V2)


def rule(step, total, harden=(0.1, 0.4), penalty=20.0, rise=0.5, settle=0.6):
    """The rule written out: (hardness, penalty scale, learning-rate factor) at ``step``."""
    f = step / total
    start, end = harden
    hardness = 0.0 if f <= start else 1.0 if f >= end else (f - start) / (end - start)
    scale = 0.0 if f <= start else penalty if f >= rise else penalty * (f - start) / (rise - start)
    learning = 1.0 if f <= settle else max(0.0, (1 - f) / (1 - settle))
    return hardness, scale, learning


@settings(max_examples=40, deadline=None)
@given(
    total=st.integers(1, 40),
    start=st.floats(0, 1),
    length=st.floats(0, 1),
    penalty=st.sampled_from([0.0, 1.0, 20.0]),
    rise=st.floats(0, 1),
    settle=st.floats(0, 1),
)
def test_every_step_follows_the_rule_in_a_plain_loop(total, start, length, penalty, rise, settle):
    model, reg = registered()
    harden = (start, min(1.0, start + length))
    rise = start + (1.0 - start) * rise  # the penalty rises from harden's start
    step = nwp.Schedule(reg, total, harden=harden, penalty=penalty, penalty_rise=rise).regroup_step
    assert rule(step, total, harden, penalty, rise)[:2] == (0.0, 0.0)  # nothing constrains at the regroup step...
    assert step == total or rule(step + 1, total, harden, penalty, rise)[0] > 0  # ...the last such
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = nwp.Schedule(reg, total, optimizer, harden=harden, penalty=penalty, penalty_rise=rise, settle=settle)
    x = torch.randn(5, 4)
    for step in range(total):
        hardness, scale, learning = rule(step, total, harden, penalty, rise, settle)
        assert reg.hardness == hardness and optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * learning)
        with reg.cached():
            got = schedule.penalty()
            assert same_bits(got, reg.penalty(alpha=scale, lam=scale))  # the same node, at this step's scale
            loss = model(x).square().mean() + got
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert reg.hardness == rule(total, total, harden)[0]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * rule(total, total, settle=settle)[2])


@pytest.mark.parametrize("total, start, rise", [(10, 0.5, 0.5), (10, 0.0, 0.0), (100, 0.29, 0.5), (7, 1.0, 1.0)])
def test_the_regroup_step_is_the_last_with_neither_hardness_nor_penalty(total, start, rise):
    _, reg = registered()
    schedule = nwp.Schedule(reg, total, harden=(start, start), penalty_rise=rise)
    step = schedule.regroup_step
    assert schedule.hardness_at(step) == schedule.scale_at(step) == 0.0  # a penalty rising at harden's start is 0 there
    assert step == total or schedule.hardness_at(step + 1) > 0  # floor(0.29 * 100) is 28: step 29 is still free


@pytest.mark.parametrize("settle", [0.0, 0.6, 1.0])
def test_the_learning_rate_factor_past_the_end_of_training_is_zero(settle):
    total = 10
    assert nwp.settling(total, total, settle) == (1.0 if settle == 1.0 else 0.0)  # the last step: the decay's end
    for step in (total + 1, 3 * total):  # a loop that runs on: no division by zero at settle=1.0
        assert nwp.settling(step, total, settle) == 0.0


def test_the_defaults_are_the_rule_and_training_ends_on_the_chip():
    model, reg = registered()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = nwp.Schedule(reg, 50, optimizer)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    for _ in range(50):
        with reg.cached():
            loss = nn.functional.cross_entropy(model(x), y) + schedule.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    assert reg.hardness == 1.0 and optimizer.param_groups[0]["lr"] == 0.0
    before = model(x).detach()
    reg.project_()
    assert reg.is_mappable() and torch.equal(model(x), before)  # computed with the chip's weights all along the last steps


def test_without_hardening_it_keeps_the_hardness_at_zero_and_without_an_optimizer_it_pairs_with_lambdalr():
    model, reg = registered()
    schedule = nwp.Schedule(reg, 10, harden=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.learning_rate)
    for step in range(10):
        assert reg.hardness == 0.0 and optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * rule(step, 10)[2])
        optimizer.step()
        decay.step()
        schedule.step()


def test_a_resumed_schedule_continues_where_it_was():
    _, reg = registered()
    schedule = nwp.Schedule(reg, 20)
    for _ in range(7):
        schedule.step()
    state = schedule.state_dict()
    _, other = registered()
    resumed = nwp.Schedule(other, 20)
    resumed.load_state_dict(state)
    assert other.hardness == reg.hardness and resumed.steps == 7 and "step 7 of 20" in repr(resumed)


@settings(max_examples=30, deadline=None)
@given(total=st.integers(1, 30), stop=st.floats(0, 1), settle=st.floats(0, 1), optimizer_first=st.booleans())
def test_a_resumed_schedule_given_the_optimizer_continues_its_learning_rates(total, stop, settle, optimizer_first):
    """Resumed at any step, from the schedule's and the optimizer's states loaded in either order, the
    learning rates and the hardness go on as if training had not stopped."""
    stop = round(stop * total)

    def fresh():
        model, reg = registered()
        optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.3}])
        return reg, optimizer

    reg, optimizer = fresh()
    schedule = nwp.Schedule(reg, total, optimizer, settle=settle)
    for _ in range(stop):
        optimizer.step()
        schedule.step()
    states = schedule.state_dict(), optimizer.state_dict()
    other, resumed_optimizer = fresh()
    if optimizer_first:
        resumed_optimizer.load_state_dict(states[1])
    resumed = nwp.Schedule(other, total, resumed_optimizer, settle=settle)
    resumed.load_state_dict(states[0])
    if not optimizer_first:
        resumed_optimizer.load_state_dict(states[1])
    for step in range(stop, total + 1):
        want = [0.1 * rule(step, total, settle=settle)[2], 0.3 * rule(step, total, settle=settle)[2]]
        assert [g["lr"] for g in resumed_optimizer.param_groups] == pytest.approx(want)
        assert resumed.learning_rates.get_last_lr() == pytest.approx(want)
        assert other.hardness == rule(step, total)[0] == reg.hardness
        for opt, sched in ((optimizer, schedule), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(total_steps=0), ValueError, "total_steps must be a positive int"),
        (dict(total_steps=10, harden=(0.5, 0.2)), ValueError, "harden must rise"),
        (dict(total_steps=10, harden=(0.1, 1.5)), ValueError, "harden must be a number in"),
        (dict(total_steps=10, harden=(0.6, 0.8)), ValueError, "penalty_rise .0.5. must not come before harden's start .0.6."),
        (dict(total_steps=10, penalty=-1.0), ValueError, "penalty must be a finite number >= 0"),
        (dict(total_steps=10, settle=2), ValueError, "settle must be a number in"),
        (dict(total_steps=10, optimizer="adam"), TypeError, "optimizer must be a torch optimizer"),
    ],
)
def test_bad_arguments_are_refused_naming_them(kwargs, error, match):
    _, reg = registered()
    with pytest.raises(error, match=match):
        nwp.Schedule(reg, **kwargs)
    with pytest.raises(TypeError, match="reg must be a Registry"):
        nwp.Schedule(nn.Linear(2, 2), 10)


@pytest.mark.parametrize("bad", [-1, -1.0, 2.5, True, None, "7", torch.tensor(2.5), torch.tensor(True), float("nan")])
def test_a_resume_from_a_bad_step_count_is_refused_and_changes_nothing(bad):
    model, reg = registered()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = nwp.Schedule(reg, 10, optimizer)
    for _ in range(7):
        schedule.step()
    before = (schedule.steps, reg.hardness, optimizer.param_groups[0]["lr"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"Schedule.load_state_dict: steps must be a whole number >= 0 .*, got {re.escape(repr(bad))}$"):
        schedule.load_state_dict({"steps": bad})
    assert model.state_dict().keys() == weights.keys() and all(same_bits(v, weights[k]) for k, v in model.state_dict().items())
    assert (schedule.steps, reg.hardness, optimizer.param_groups[0]["lr"]) == before
    for through in (torch.tensor(3), 3.0, torch.tensor(3.0), np.float32(3)):  # through a tensor-only format, or a float
        schedule.load_state_dict({"steps": through})
        assert schedule.steps == 3 and type(schedule.steps) is int and reg.hardness == rule(3, 10)[0]


@pytest.mark.parametrize("warmup_first", [False, True])
def test_a_second_scheduler_on_its_optimizer_is_refused_at_the_next_step(warmup_first):
    """Its LambdaLR sets each rate from the initial one: another scheduler's change would be lost
    or scaled wrongly (a warmup's rate reached 2.8 times the base), so the next step refuses it,
    changing nothing."""
    model, reg = registered()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    make_warmup = lambda: torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=5)  # noqa: E731
    warmup = make_warmup() if warmup_first else None
    schedule = nwp.Schedule(reg, 10, optimizer)
    warmup = warmup or make_warmup()
    optimizer.step()
    warmup.step()
    optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.5})  # not adopted by a refused step
    rates, hardness = [group["lr"] for group in optimizer.param_groups], reg.hardness
    weights, outputs = {k: v.clone() for k, v in model.state_dict().items()}, model(torch.ones(2, 4))
    with pytest.raises(RuntimeError, match=r"Schedule: param group 0's learning rate is .*, not the 1.0 the schedule set"):
        schedule.step()
    assert (schedule.steps, reg.hardness, [group["lr"] for group in optimizer.param_groups]) == (0, hardness, rates)
    assert model.state_dict().keys() == weights.keys() and all(same_bits(v, weights[k]) for k, v in model.state_dict().items())
    assert same_bits(model(torch.ones(2, 4)), outputs)
    assert len(schedule.learning_rates.get_last_lr()) == 1 and "initial_lr" not in optimizer.param_groups[1]


@pytest.mark.parametrize("tensor_rate", [False, True])
@pytest.mark.parametrize("added_at", [0, 3, 7, 10])
def test_a_param_group_added_later_decays_like_the_others_from_its_rate_then(added_at, tensor_rate):
    """Layers unfrozen during training: the group added at step ``added_at`` follows the rule's
    factor on the rate it was added with, as if it had been there from the start (a tensor rate,
    which LambdaLR fills in place, too)."""
    model, reg = registered()
    optimizer = torch.optim.SGD([model[0].bias], lr=1.0)
    schedule = nwp.Schedule(reg, 10, optimizer)
    for step in range(12):
        if step == added_at:
            optimizer.add_param_group({"params": [model[2].bias], "lr": torch.tensor(0.4) if tensor_rate else 0.4})
        optimizer.step()
        schedule.step()
        rates = [float(group["lr"]) for group in optimizer.param_groups]
        assert rates == pytest.approx([1.0 * rule(step + 1, 10)[2]] + [0.4 * rule(step + 1, 10)[2]] * (step >= added_at))


def test_a_warmup_combines_with_the_decay_in_one_lambdalr():
    """What the docstring shows: no optimizer given, one LambdaLR whose factor is the product."""
    model, reg = registered()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    schedule = nwp.Schedule(reg, 10)
    warmup = lambda t: min(1.0, (t + 1) / 3)  # noqa: E731
    rates = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: warmup(t) * schedule.learning_rate(t))
    for step in range(10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(warmup(step) * rule(step, 10)[2])
        optimizer.step()
        rates.step()
        schedule.step()


@pytest.mark.parametrize("accumulate", [1, 3])
def test_as_a_lightning_callback_it_steps_after_each_optimizer_step(tmp_path, accumulate):
    L = pytest.importorskip("lightning", reason=not_installed("lightning"))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.reg = registered()
            self.schedule = nwp.Schedule(self.reg, total_steps=12)

        def training_step(self, batch, batch_idx):
            x, y = batch
            with self.reg.cached():
                return nn.functional.cross_entropy(self.net(x), y) + self.schedule.penalty()

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            decay = torch.optim.lr_scheduler.LambdaLR(optimizer, self.schedule.learning_rate)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}

    data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randint(0, 3, (48,)))
    module = Module()
    hardness = []

    class Watch(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            hardness.append(module.reg.hardness)

    trainer = L.Trainer(
        max_steps=12, callbacks=[module.schedule.callback(), Watch()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accumulate_grad_batches=accumulate,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == module.schedule.steps == 12 and module.reg.hardness == 1.0
    assert hardness == [rule(step, 12)[0] for step in range(12)]  # each optimizer step at its own step's hardness
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)


def test_as_a_lightning_callback_it_counts_each_optimizer_step_as_global_step_does(tmp_path):
    """Manual optimization with two optimizers: ``global_step`` counts both, and so does the
    schedule, so that ``total_steps`` is what ``max_steps`` counts."""
    L = pytest.importorskip("lightning", reason=not_installed("lightning"))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net, self.reg = registered()
            self.schedule = nwp.Schedule(self.reg, total_steps=12)

        def training_step(self, batch, batch_idx):
            x, y = batch
            for optimizer in self.optimizers():
                with self.reg.cached():
                    loss = nn.functional.cross_entropy(self.net(x), y) + self.schedule.penalty()
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()

        def configure_optimizers(self):
            return torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2].parameters(), lr=0.1)

    data = torch.utils.data.TensorDataset(torch.randn(24, 4), torch.randint(0, 3, (24,)))
    module = Module()
    trainer = L.Trainer(
        max_steps=12, callbacks=[module.schedule.callback()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.global_step == module.schedule.steps == 12 and module.reg.hardness == 1.0
