"""The demo's quick run: the JSON's shape and ranges, the table, the picture and the progress lines.

The accuracy targets are checked at full length in the closing note of the demo issue: a test
must not depend on them.  What holds at any length is checked here: a hardened run computes with
what the chip holds, so projecting it changes no prediction.
"""

import json
import re

import pytest
from installs import not_installed  # noqa: E402

for _package in ("sklearn", "snntorch", "matplotlib"):
    pytest.importorskip(_package, reason=not_installed(_package))

from nwave_param.checkpoints.cli import main  # noqa: E402

KEYS = {"float_accuracy", "projected_accuracy", "mappable_before", "mappable_after", "out_of_range_fraction", "mixed_block_column_fraction"}


@pytest.mark.slow
def test_quick_demo_writes_json_table_plot_and_progress(tmp_path, capsys):
    out, picture = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--quick", "--json", str(out), "--plot", str(picture)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["task", "seed", "chip", "placement", "baseline", "constrained", "hardened"]
    assert (data["task"], data["seed"], data["chip"]) == ("digits", 0, "h1v2")  # the default task, on the kit's chip
    assert data["placement"]["fits"] is True and data["placement"]["problems"] == []
    populations = {p["name"]: p for p in data["placement"]["populations"]}
    assert populations["hidden.0.lif"]["recurrent"] and populations["hidden.0.lif"]["cores"] == {"2": 100}  # the largest core, whole
    assert populations["front"]["front_end"] and populations["front"]["neurons"] == 16  # one neuron per ON/OFF channel
    for run in (data[name] for name in ("baseline", "constrained", "hardened")):
        assert set(run) == KEYS
        assert isinstance(run["mappable_before"], bool) and run["mappable_after"] is True
        for key in KEYS - {"mappable_before", "mappable_after"}:
            assert 0.0 <= run[key] <= 1.0, key
    assert data["hardened"]["projected_accuracy"] == data["hardened"]["float_accuracy"]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "test accuracy on the chip (projected)" in printed.out and "hardened" in printed.out
    assert "lif.recurrent.weight" in printed.out and "fits" in printed.out and "core 2: 100" in printed.out
    progress = [line for line in printed.err.splitlines() if "epochs in" in line]  # not a terminal: one line a run
    assert [line.split(":")[0] for line in progress] == ["baseline", "constrained", "hardened"]


def test_demo_rejects_bad_epochs(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_demo_on_a_grid_with_mismatch_reports_a_fleet_of_chips(capsys):
    assert main(["demo", "--quick", "--bits", "5", "--mismatch", "0.02", "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # stdout holds the JSON alone, the tables go to stderr
    for run in (data[name] for name in ("baseline", "constrained", "hardened")):
        assert set(run) == KEYS | {"chip_accuracy_mean", "chip_accuracy_worst"}
        assert 0.0 <= run["chip_accuracy_worst"] <= run["chip_accuracy_mean"] <= 1.0
    assert data["hardened"]["projected_accuracy"] == data["hardened"]["float_accuracy"]
    assert "test accuracy on 10 chips, worst" in err


def test_every_run_follows_the_schedules_learning_rate_and_only_the_hardened_one_hardens(monkeypatch):
    import torch

    from nwave_param import Schedule, demo, register

    rates, hardness = {}, {}

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            rates[run].append(self.param_groups[0]["lr"])
            hardness[run].append(reg.hardness)
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    data = demo.validation_split(demo.digits())
    for run in demo.RUNS:
        rates[run], hardness[run] = [], []
        torch.manual_seed(0)
        model = demo.SpikingNet(channels=16, classes=10)
        reg = register(model)
        demo.train(model, reg, data, demo.TASKS["digits"], 2, run, seed=0)
    steps = len(rates["baseline"])
    schedule = Schedule(register(torch.nn.Linear(2, 2)), steps)
    for run in demo.RUNS:  # the same learning rate in every run: the gap measures the chip alone
        assert rates[run] == pytest.approx([3e-3 * schedule.learning_rate(k) for k in range(steps)], rel=1e-12)
    assert hardness["hardened"] == [schedule.hardness_at(k) for k in range(steps)]
    assert set(hardness["baseline"]) == set(hardness["constrained"]) == {0.0}


def test_the_tasks_data_the_split_and_the_validation_split_are_fixed():
    import torch

    from nwave_param import demo

    x_train, y_train, x_test, y_test = demo.vowels()
    assert x_train.shape == (29 * demo.REPEAT, 270, 12) and x_test.shape == (29 * demo.REPEAT, 370, 12)
    assert torch.equal(y_train.bincount(), torch.full((9,), 30))  # 30 utterances a speaker
    digits = demo.digits()
    assert digits[0].shape[::2] == (8, 16) and torch.equal(demo.digits()[0], digits[0])  # the same split every time
    fit_x, fit_y, held_x, held_y = demo.validation_split((x_train, y_train, x_test, y_test))
    assert fit_y.numel() + held_y.numel() == 270 and torch.equal(held_y.bincount(), torch.full((9,), 6))  # stratified
    assert torch.equal(demo.validation_split((x_train, y_train, x_test, y_test))[3], held_y)


def _fold_zero_as_first_published(y, fraction=0.2):
    """The validation split as the docs' runs drew it, before folds existed: each class's first
    ``round(fraction * n)`` members in the fixed shuffled order."""
    import torch

    from nwave_param import demo

    generator = torch.Generator().manual_seed(demo.SPLIT_SEED)
    held = torch.zeros(y.numel(), dtype=torch.bool)
    for label in y.unique():
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        held[members[: max(1, round(fraction * members.numel()))]] = True
    return held


def test_the_validation_folds_partition_the_training_set_by_class():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(5, 40), min_size=1, max_size=6), st.sampled_from([0.2, 0.25, 0.5]), st.randoms(use_true_random=False))
    def check(counts, fraction, rng):
        import torch

        from nwave_param import demo

        labels = [label for label, count in enumerate(counts) for _ in range(count)]
        rng.shuffle(labels)
        y = torch.tensor(labels)
        x = torch.arange(y.numel()).float().view(1, -1, 1)  # each example's index, to find it again
        folds = round(1 / fraction)
        seen = torch.zeros(y.numel(), dtype=torch.long)
        for fold in range(folds):
            fit_x, fit_y, held_x, held_y = demo.validation_split((x, y, x, y), fraction, fold)
            held = held_x.flatten().long()
            seen[held] += 1
            assert sorted(fit_x.flatten().long().tolist() + held.tolist()) == list(range(y.numel()))
            assert torch.equal(held_y, y[held]) and torch.equal(fit_y, y[fit_x.flatten().long()])
            for label, count in enumerate(counts):  # stratified: each class's share, the last fold the rest
                size = max(1, round(fraction * count))
                expected = size if fold < folds - 1 else count - (folds - 1) * size
                assert int((held_y == label).sum()) == max(expected, 0)
        assert bool((seen == 1).all())  # every example held out exactly once
        first = demo.validation_split((x, y, x, y), fraction)[2].flatten().long()
        assert torch.equal(torch.zeros(y.numel(), dtype=torch.bool).index_fill_(0, first, True), _fold_zero_as_first_published(y, fraction))

    check()


@pytest.mark.parametrize("fold", [-1, 5, 1.0, True])
def test_a_fold_out_of_range_or_without_validation_is_refused(fold):
    import torch

    from nwave_param import demo

    data = (torch.zeros(1, 10, 1), torch.arange(10) % 2, torch.zeros(1, 4, 1), torch.arange(4) % 2)
    with pytest.raises(ValueError, match=r"fold must be an integer in \[0, 5\)"):
        demo.validation_split(data, fold=fold)
    with pytest.raises(ValueError, match="pass validation=True"):
        demo.run(1, task="digits", fold=1)


# a recurrent population on every core the front end and the readout do not need: on H1v1 the
# vowels' 12 + 45 fit in one core, the digits' 16 + 50 need two
@pytest.mark.parametrize(
    "chip, task, channels, classes, hidden",
    [
        ("h1v1", "vowels", 12, 9, [64, 64, 64]), ("h1v1", "digits", 16, 10, [64, 64]),
        ("h1v2", "vowels", 12, 9, [100]), ("h1v2", "digits", 16, 10, [100]),
    ],
)
def test_the_network_is_built_for_the_chip_from_its_blocks(chip, task, channels, classes, hidden):
    import torch

    import nwave_param as nwp
    from nwave_param import demo

    spec = demo.CHIP_SPECS[chip]
    torch.manual_seed(0)
    model = demo.SpikingNet(spec, channels, classes)
    x = demo.TASKS[task].load()[2][:, :5]
    placement = nwp.place(model, x, spec)
    assert placement.fits, placement.problems
    assert [(p.name, p.neurons, p.recurrent) for p in placement.populations] == [
        ("front", channels, False), *((f"hidden.{i}.lif", size, True) for i, size in enumerate(hidden)),
        ("out", classes * demo.READOUT_NEURONS, False),
    ]
    hidden_cores = [core for p in placement.populations if p.recurrent for core in p.cores]
    assert len(set(hidden_cores)) == len(hidden_cores) == len(hidden)  # each whole on a core of its own
    assert isinstance(model.gain, nwp.FrontEnd) and isinstance(model.front, type(nwp.ChipLeaky(0.9)))
    for layer in (model.front, *(population.lif for population in model.hidden), model.out):
        threshold = torch.tensor(spec.limit / demo.LIMIT_IN_THRESHOLDS)  # one threshold, as float32 holds it
        assert layer.reset_mechanism == spec.reset and torch.equal(torch.as_tensor(layer.threshold), threshold)
        # the surrogate's reach, in thresholds, is the same on either chip: fast_sigmoid's gradient
        # 1 / (1 + slope |u|)^2 is 1 at the threshold and 1/4 at SURROGATE_WIDTH thresholds from it
        distance = torch.tensor([0.0, demo.SURROGATE_WIDTH * spec.limit / demo.LIMIT_IN_THRESHOLDS], requires_grad=True)
        layer.spike_grad(distance).sum().backward()
        torch.testing.assert_close(distance.grad, torch.tensor([1.0, 0.25]))
    reg = nwp.register(model, spec).harden(1.0)
    model(x).sum().backward()  # it trains through the clamp
    assert all(p.grad is not None for p in reg.latent_weights())


@pytest.mark.parametrize(
    "cores, task, hidden",
    [
        ((50, 50, 100), "digits", [100]), ((50, 50, 100), "vowels", [100]), ((64,) * 4, "digits", [64, 64]),
        ((64,) * 4, "vowels", [64, 64, 64]), ((128, 128), "digits", [128]), ((64, 64, 30, 30), "digits", [64]),
        ((30, 64, 50), "vowels", [64]),
    ],
)
def test_the_recurrent_populations_take_the_cores_the_front_end_and_readout_do_not_need(cores, task, hidden):
    import torch

    import nwave_param as nwp
    from nwave_param import demo

    spec, x = demo.H1V1.replace(cores=cores), demo.TASKS[task].load()[2][:, :3]
    channels, outputs = x.shape[-1], demo.TASKS[task].classes * demo.READOUT_NEURONS
    assert demo.hidden_sizes(spec, (channels, outputs)) == hidden
    torch.manual_seed(0)
    model = demo.SpikingNet(spec, channels, demo.TASKS[task].classes)
    assert [population.lif.recurrent.in_features for population in model.hidden] == hidden
    assert nwp.place(model, x, spec).fits


@pytest.mark.parametrize("cores", [(64, 64), (33, 33, 64), (200,)])
def test_a_chip_with_no_core_left_for_a_recurrent_population_is_refused_by_name(cores):
    from nwave_param import demo

    with pytest.raises(ValueError, match=re.escape(f"the front end and the readout (16 + 50 neurons) leave no core of {cores}")):
        demo.SpikingNet(demo.H1V1.replace(cores=cores), 16, 10)
