"""The nwave-param command line on real files in a temporary directory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import nwave_param as nwp
from nwave_param.cli import main


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 7), nn.LSTM(7, 6, num_layers=2, proj_size=3), nn.Conv1d(3, 6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    return model


def make_grouped_transposed():
    torch.manual_seed(1)
    model = nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2), nn.Conv1d(6, 6, 1, groups=3))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    return model


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def plain(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(make_model().state_dict(), path)
    return path


def test_check_prints_report_and_exits_1_when_not_mappable(plain, capsys):
    code, out, err = run(capsys, "check", plain)
    assert code == 1 and err == ""
    assert "NOT mappable" in out and "1.weight_hh_l0" in out and "total" in out
    assert "read as plain convolutions" in out and "2.weight" in out


def test_check_json_matches_registry_report(plain, capsys):
    code, out, _ = run(capsys, "check", plain, "--json")
    data = json.loads(out)
    assert code == 1 and data["mappable"] is False
    model = make_model()
    expected = nwp.register(model).report()
    assert [w["name"] for w in data["rows"]] == [r.name for r in expected.rows]
    for row, reference in zip(data["rows"], expected.rows):
        assert row["mixed_block_columns"] == reference.mixed_block_columns and row["out_of_range"] == reference.out_of_range
        assert row["block_columns"] == reference.block_columns
        assert row["topology"] == pytest.approx(reference.topology)


def test_project_writes_mappable_checkpoint_and_keeps_everything_else(plain, tmp_path, capsys):
    out_path = tmp_path / "projected.pt"
    code, out, _ = run(capsys, "project", plain, "-o", out_path)
    assert code == 0 and "before" in out and "after" in out and "NOT mappable" in out
    original = torch.load(plain, weights_only=True)
    projected = torch.load(out_path, weights_only=True)
    assert list(projected) == list(original)
    for key in original:
        if "bias" in key:
            assert torch.equal(projected[key], original[key])
    model = make_model()
    reg = nwp.register(model)
    reg.project_()
    for key, value in nwp.plain_state_dict(model).items():
        assert torch.equal(projected[key], value), key
    assert run(capsys, "check", out_path)[0] == 0


def test_lightning_style_and_registered_checkpoints(tmp_path, capsys):
    model = make_model()
    reg = nwp.register(model)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 7, "optimizer_states": [{"lr": 0.1}]}, path)
    code, out, _ = run(capsys, "check", path, "--json")
    data = json.loads(out)
    assert code == 1
    assert [w["name"] for w in data["rows"]] == reg.names
    out_path = tmp_path / "out.ckpt"
    assert run(capsys, "project", path, "-o", out_path)[0] == 0
    written = torch.load(out_path, weights_only=True)
    assert written["epoch"] == 7 and written["optimizer_states"] == [{"lr": 0.1}]
    assert list(written["state_dict"]) == list(model.state_dict())
    fresh = make_model()
    nwp.register(fresh)
    fresh.load_state_dict(written["state_dict"])
    assert nwp.registry_of(fresh).is_mappable()


def test_model_factory_gives_exact_layouts(tmp_path, capsys, monkeypatch):
    (tmp_path / "factory_mod.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.ConvTranspose1d(4, 6, 3, groups=2), nn.Conv1d(6, 6, 1, groups=3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    model = make_grouped_transposed()
    path = tmp_path / "conv.pt"
    torch.save(model.state_dict(), path)
    code, out, _ = run(capsys, "check", path, "--model", "factory_mod:build", "--json")
    data = json.loads(out)
    expected = nwp.register(make_grouped_transposed()).report()
    assert [r["mixed_block_columns"] for r in data["rows"]] == [r.mixed_block_columns for r in expected.rows]
    assert [r["block_columns"] for r in data["rows"]] == [r.block_columns for r in expected.rows]
    assert data["notes"] == []
    out_path = tmp_path / "conv_projected.pt"
    assert run(capsys, "project", path, "-o", out_path, "--model", "factory_mod:build")[0] == 0
    assert run(capsys, "check", out_path, "--model", "factory_mod:build")[0] == 0


def test_options_limit_group_size_exclude(plain, capsys):
    data = json.loads(run(capsys, "check", plain, "--json", "--limit", "100", "--group-size", "1", "--exclude", "1.*")[1])
    assert data["mappable"] is True and data["spec"]["limit"] == 100.0
    assert [w["name"] for w in data["rows"]] == ["0.weight", "2.weight"]


def _error(capsys, *argv):
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_pickled_full_model_is_refused(tmp_path, capsys):
    path = tmp_path / "full.pt"
    torch.save(make_model(), path)
    assert "pickled" in _error(capsys, "check", path)


def test_truncated_missing_and_foreign_files(plain, tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[:200])
    assert "not a readable" in _error(capsys, "check", truncated)
    assert "no such file" in _error(capsys, "check", tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    torch.save({"step": torch.tensor(3), "scale": torch.ones(4)}, foreign)
    assert "no trackable weight" in _error(capsys, "check", foreign)
    odd_rnn = tmp_path / "odd_rnn.pt"
    torch.save({"rnn.weight_ih_l0": torch.zeros(10, 3), "rnn.weight_hh_l0": torch.zeros(10, 5)}, odd_rnn)
    assert "fits no RNN" in _error(capsys, "check", odd_rnn)


def test_bad_usage_exits_2(plain, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check"])
    assert exit_info.value.code == 2 and "CHECKPOINT" in capsys.readouterr().err
    assert "limit" in _error(capsys, "check", plain, "--limit", "-1")
    assert "no trackable weight" in _error(capsys, "check", plain, "--exclude", "*")


def test_project_never_overwrites_input(plain, capsys):
    before = plain.read_bytes()
    assert "overwrite" in _error(capsys, "project", plain, "-o", plain)
    assert plain.read_bytes() == before


def test_project_refuses_nonfinite_and_writes_nothing(tmp_path, capsys):
    state = make_model().state_dict()
    state["0.weight"][0, 0] = float("nan")
    path, out_path = tmp_path / "nan.pt", tmp_path / "out.pt"
    torch.save(state, path)
    assert "0.weight" in _error(capsys, "project", path, "-o", out_path)
    assert not out_path.exists()
    code, out, _ = run(capsys, "check", path, "--json")
    assert code == 1 and json.loads(out)["rows"][0]["nonfinite"] == 1


def _read_only_directory(tmp_path):
    """A directory this process cannot write to (root ignores mode bits, but not a read-only mount)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    for candidate in (directory, "/sys"):
        try:
            probe = os.path.join(candidate, ".probe")
            open(probe, "wb").close()
            os.unlink(probe)
        except OSError:
            return candidate
    pytest.skip("no read-only directory available on this machine (root and a writable /sys)")


def test_project_into_read_only_directory_fails_cleanly(plain, tmp_path, capsys):
    directory = _read_only_directory(tmp_path)
    assert "cannot write" in _error(capsys, "project", plain, "-o", os.path.join(directory, "out.pt"))


def test_console_entry_points(plain):
    result = subprocess.run(
        [sys.executable, "-m", "nwave_param", "check", str(plain), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 1 and json.loads(result.stdout)["mappable"] is False


def test_model_factory_keeps_checkpoint_dtype_and_projects_tied_aliases(tmp_path, capsys, monkeypatch):
    (tmp_path / "tied_mod.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False))\n"
        "    model[1].weight = model[0].weight\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    weight = torch.tensor([[0.9000000001, -0.2, 0.1], [0.5, 0.3, -0.4], [-1.5, 0.2, 0.2]], dtype=torch.float64)
    path, out_path = tmp_path / "tied.pt", tmp_path / "tied_out.pt"
    torch.save({"0.weight": weight, "1.weight": weight}, path)
    # float64 values above the limit by 1e-10 stay out of range: the model's float32 is not used
    assert run(capsys, "check", path, "--model", "tied_mod:build")[0] == 1
    assert run(capsys, "project", path, "-o", out_path, "--model", "tied_mod:build")[0] == 0
    written = torch.load(out_path, weights_only=True)
    assert written["0.weight"].dtype == torch.float64 and torch.equal(written["0.weight"], written["1.weight"])
    assert run(capsys, "check", out_path, "--model", "tied_mod:build")[0] == 0


def test_missing_input_with_existing_output_is_a_clean_error(tmp_path, capsys):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")
    assert "no such file" in _error(capsys, "project", tmp_path / "missing.pt", "-o", existing)
    assert existing.read_bytes() == b"keep me"


def test_exclude_note_matches_weight_names_of_registered_checkpoints(tmp_path, capsys):
    model = make_model()
    nwp.register(model)
    path = tmp_path / "registered.pt"
    torch.save(model.state_dict(), path)
    out = run(capsys, "check", path, "--exclude", "0.weight", "--json")[1]
    data = json.loads(out)
    assert "0.weight" not in [w["name"] for w in data["rows"]]
    assert not any("matched no" in note for note in data["notes"])
    assert any("nothing.*" in note for note in json.loads(run(capsys, "check", path, "--exclude", "nothing.*", "--json")[1])["notes"])
