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


def test_quick_demo_writes_json_table_plot_and_progress(tmp_path, capsys):
    out, picture = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--quick", "--json", str(out), "--plot", str(picture)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["baseline", "constrained", "hardened"]
    for run in data.values():
        assert set(run) == KEYS
        assert isinstance(run["mappable_before"], bool) and run["mappable_after"] is True
        for key in KEYS - {"mappable_before", "mappable_after"}:
            assert 0.0 <= run[key] <= 1.0, key
    assert data["hardened"]["projected_accuracy"] == data["hardened"]["float_accuracy"]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr()
    assert "test accuracy on the chip (projected)" in printed.out and "hardened" in printed.out
    assert "lif.recurrent.weight" in printed.out
    progress = [line for line in printed.err.splitlines() if "epochs in" in line]  # not a terminal: one line a run
    assert [line.split(":")[0] for line in progress] == ["baseline", "constrained", "hardened"]


def test_demo_rejects_bad_epochs(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_quick_demo_on_a_grid_with_mismatch_reports_a_fleet_of_chips(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--bits", "5", "--mismatch", "0.02", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    for run in data.values():
        assert set(run) == KEYS | {"chip_accuracy_mean", "chip_accuracy_worst"}
        assert 0.0 <= run["chip_accuracy_worst"] <= run["chip_accuracy_mean"] <= 1.0
    assert data["hardened"]["projected_accuracy"] == data["hardened"]["float_accuracy"]
    assert "test accuracy on 10 chips, worst" in capsys.readouterr().out


@pytest.mark.parametrize("spec", [None, "grid"])
def test_learning_rate_settles_only_when_training_against_a_grid(monkeypatch, spec):
    import torch

    from nwave_param import ChipSpec, register
    from nwave_param import demo

    rates = []

    class RecordingAdam(torch.optim.Adam):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)
    torch.manual_seed(0)
    model = demo.SpikingNet()
    reg = register(model, ChipSpec(bits=5) if spec else None)
    demo.train(model, reg, demo.digits(), 2, "baseline")
    steps = len(rates)
    end = demo.HARDEN["grid or mismatch"][1]
    if spec is None:
        assert rates == [3e-3] * steps
    else:  # constant until the hardness reaches 1, then linearly towards 0
        expected = [3e-3 * min(1.0, (steps - k) / ((1 - end) * steps)) for k in range(steps)]
        assert rates == pytest.approx(expected, rel=1e-12)
        assert rates[0] == 3e-3 and rates[-1] < 3e-3 / 10
