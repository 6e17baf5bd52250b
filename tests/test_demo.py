"""The demo's quick run: the JSON's shape and ranges (the accuracy targets are checked by hand,
at full length, in the closing note of the demo issue; a test must not depend on them)."""

import json

import pytest

pytest.importorskip("sklearn", reason="the demo extra is not installed (pip install -e '.[demo]')")
pytest.importorskip("snntorch", reason="the demo extra is not installed (pip install -e '.[demo]')")
pytest.importorskip("matplotlib", reason="the demo extra is not installed (pip install -e '.[demo]')")

from nwave_param.cli import main  # noqa: E402

KEYS = {"float_accuracy", "projected_accuracy", "mappable_before", "out_of_range_fraction", "mixed_group_fraction"}


def test_quick_demo_writes_json_and_plot(tmp_path, capsys):
    out, picture = tmp_path / "demo.json", tmp_path / "demo.png"
    assert main(["demo", "--quick", "--json", str(out), "--plot", str(picture)]) == 0
    data = json.loads(out.read_text())
    assert set(data) == {"baseline", "constrained"}
    for run in data.values():
        assert set(run) == KEYS
        assert isinstance(run["mappable_before"], bool)
        for key in KEYS - {"mappable_before"}:
            assert 0.0 <= run[key] <= 1.0, key
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "test accuracy after projection" in printed and "lif.recurrent.weight" in printed


def test_demo_rejects_bad_epochs(capsys):
    assert main(["demo", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err
