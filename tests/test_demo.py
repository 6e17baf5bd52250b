"""The demo's quick run: the JSON's shape and ranges, the table, the picture and the progress lines.

The accuracy targets are checked at full length in the closing note of the demo issue: a test
must not depend on them.  What holds at any length is checked here: a hardened run computes with
what the chip holds, so projecting it changes no prediction.
"""

import json

import pytest

pytest.importorskip("sklearn", reason="the demo extra is not installed (pip install -e '.[demo]')")
pytest.importorskip("snntorch", reason="the demo extra is not installed (pip install -e '.[demo]')")
pytest.importorskip("matplotlib", reason="the demo extra is not installed (pip install -e '.[demo]')")

from nwave_param.cli import main  # noqa: E402

KEYS = {"float_accuracy", "projected_accuracy", "mappable_before", "mappable_after", "out_of_range_fraction", "mixed_block_column_fraction"}


@pytest.mark.slow
def test_quick_demo_writes_json_table_plot_and_progress(tmp_path, capsys):
    out, picture = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--quick", "--json", str(out), "--plot", str(picture)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["chip", "placement", "baseline", "constrained", "hardened"]
    assert data["chip"] == "h1v2" and data["placement"]["fits"] is True and data["placement"]["problems"] == []
    populations = {p["name"]: p for p in data["placement"]["populations"]}
    assert populations["lif"]["recurrent"] and populations["lif"]["cores"] == {"2": 100}  # the largest core, whole
    assert populations["front"]["front_end"] and populations["front"]["neurons"] == 16  # one neuron per front-end channel
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


def test_the_learning_rate_is_constant_then_settles_linearly_to_zero(monkeypatch):
    import torch

    from nwave_param import demo, register

    rates = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    torch.manual_seed(0)
    model = demo.SpikingNet()
    reg = register(model)
    demo.train(model, reg, demo.digits(), 2, "baseline")
    steps = len(rates)
    expected = [3e-3 * min(1.0, (steps - k) / ((1 - demo.SETTLE) * steps)) for k in range(steps)]
    assert rates == pytest.approx(expected, rel=1e-12)
    assert rates[0] == 3e-3 and rates[-1] < 3e-3 / 10


@pytest.mark.parametrize("chip, hidden", [("h1v1", 64), ("h1v2", 100)])
def test_the_network_is_built_for_the_chip_and_its_neurons_follow_the_documented_dynamics(chip, hidden):
    import torch

    import nwave_param as nwp
    from nwave_param import demo

    spec = demo.CHIP_SPECS[chip]
    torch.manual_seed(0)
    model = demo.SpikingNet(spec)
    x = torch.rand(8, 5, 8)
    placement = nwp.place(model, x, spec)
    assert placement.fits, placement.problems
    assert [(p.name, p.neurons, p.recurrent) for p in placement.populations] == [("front", 16, False), ("lif", hidden, True), ("out", 50, False)]
    assert torch.count_nonzero(model.gain.weight - torch.diag(torch.diagonal(model.gain.weight))) == 0  # one-to-one
    updated, carried = [], []  # each update's membrane, and the membrane each step starts from
    for layer in (model.front, model.lif, model.out):
        layer.register_forward_hook(lambda module, args, output: updated.append(output[-1]))
        layer.register_forward_pre_hook(lambda module, args: carried.append(args[-1]))
        assert layer.reset_mechanism == spec.reset and float(layer.threshold) == demo.THRESHOLD  # one threshold for all
    reg = nwp.register(model, spec).harden(1.0)
    model(x).sum().backward()  # it trains through the clamp
    assert all(p.grad is not None for p in reg.latent_weights())
    assert min(float(m.min()) for m in updated) < 0  # snnTorch's update goes below zero ...
    assert min(float(m.min()) for m in carried if m.numel()) >= 0  # ... and the chip's membrane never does: clamped after each update
