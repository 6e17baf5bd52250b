"""The nwave-param command line on real files in a temporary directory."""

import contextlib
import errno
import io
import json
import os
import signal
import stat
import subprocess
import sys
import zipfile

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from installs import not_installed
from layers import same_bits, scaled, weight_name
from torch import nn
from torch.nn.utils import parametrize

import nwave_param as nwp
from nwave_param.checkpoints import files
from nwave_param.checkpoints.cli import main
from nwave_param.functional import project
from nwave_param.layout import Layout

NEEDS_SAFETENSORS = "the safetensors extra is not installed (pip install -e '.[safetensors]')"

# The model of the issue: a grouped, a depthwise and a transposed convolution, an embedding.
MIXED_SOURCE = """
from torch import nn

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.grouped = nn.Conv1d(8, 8, 3, groups=4)
        self.depthwise = nn.Conv1d(8, 8, 3, groups=8)
        self.up = nn.ConvTranspose1d(8, 6, 3, groups=2)
        self.head = nn.Linear(6, 4)

def build():
    return Mixed()
"""
GUESSED = ("grouped.weight", "depthwise.weight", "up.weight")


# --- helpers -----------------------------------------------------------------------------------


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv):
    """The one line of a failed run (exit 2, no traceback)."""
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and out == "", (code, out, err)
    return lines[0]


def usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def leftovers(directory):
    return [name for name in os.listdir(directory) if name.startswith(".nwave-param")]


def load(path):
    return torch.load(path, weights_only=True)


def reset_scaled(model, factor, seed):
    """``model`` reinitialised from ``seed``, then scaled by ``factor``."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return scaled(model, factor)


def make_model():
    model = nn.Sequential(nn.Linear(4, 7), nn.LSTM(7, 6, num_layers=2, proj_size=3), nn.Linear(3, 6))
    return reset_scaled(model, 5, 0)


@pytest.fixture
def plain(tmp_path):
    """Linear and LSTM weights only: every layout is certain without --model."""
    path = tmp_path / "plain.pt"
    torch.save(make_model().state_dict(), path)
    return path


@pytest.fixture
def mixed(tmp_path, monkeypatch):
    """The module factory ``mixed_mod:build``, importable from the working directory."""
    (tmp_path / "mixed_mod.py").write_text(MIXED_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("mixed_mod", None)
    import mixed_mod

    return mixed_mod


def mappable_mixed(mixed):
    """Mixed, projected in Python (exact layouts): mappable, its embedding far out of range."""
    model = reset_scaled(mixed.build(), 4, 0)
    reg = nwp.register(model)
    reg.project_()
    return model, reg


# --- the model: guessed layouts are never changed without a flag -------------------------


def test_the_command_line_is_a_shell_over_the_python_api(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 5)), 3.0)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    calls = []

    from nwave_param.checkpoints import offline  # what the commands call: the Python API's own functions

    def spy(name):
        real = getattr(offline, name)
        assert real is getattr(nwp, name)

        def call(state_dict, spec=None, **options):
            calls.append((name, spec, sorted(options)))
            return real(state_dict, spec, **options)

        monkeypatch.setattr(offline, name, call)

    spy("check_state_dict"), spy("project_state_dict")
    code, out, _ = run(capsys, "check", path, "--chip", "h1v2", "--json")
    assert code == 1 and calls == [("check_state_dict", nwp.H1V2, ["assume_plain", "exclude"])]
    assert json.loads(out)["rows"][0] == nwp.check_state_dict(torch.load(path), nwp.H1V2).to_dict()["rows"][0]
    calls.clear()
    code, _, _ = run(capsys, "project", path, "-o", tmp_path / "out.pt", "--bits", "4")
    assert code == 0 and [name for name, *_ in calls] == ["check_state_dict", "project_state_dict", "check_state_dict"]
    assert all(spec == nwp.ChipSpec(bits=4) for _, spec, _ in calls)  # --bits on top of the checkpoint's spec (none: H1v1)
    expected, _ = nwp.project_state_dict(torch.load(path), nwp.ChipSpec(bits=4))
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(written) == list(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


def test_guessed_layouts_without_model_exit_2_and_write_nothing(mixed, tmp_path, capsys):
    model, reg = mappable_mixed(mixed)
    torch.save(nwp.plain_state_dict(model), "mixed.pt")
    line = error(capsys, "project", "mixed.pt", "-o", "out.pt")
    assert "guessed" in line and "--assume-plain" in line and "--model" in line
    assert all(name in line for name in GUESSED) and "head.weight" not in line and "embed.weight" not in line
    assert not os.path.exists("out.pt") and leftovers(tmp_path) == []


def test_check_marks_guessed_layouts_and_excludes_embeddings(mixed, capsys):
    model, _ = mappable_mixed(mixed)
    torch.save(nwp.plain_state_dict(model), "mixed.pt")
    code, out, _ = run(capsys, "check", "mixed.pt")
    assert code == 1  # the plain reading mixes the groups' block columns
    for name in GUESSED:
        assert f"{name} (assumed)" in out
    assert "head.weight (assumed)" not in out and "head.weight" in out
    assert "note: excluded as embeddings" in out and "embed.weight" in out and "note: (assumed)" in out
    data = json.loads(run(capsys, "check", "mixed.pt", "--json")[1])
    assert {row["name"]: row["layout"] for row in data["rows"]} == {**dict.fromkeys(GUESSED, "assumed"), "head.weight": "exact"}
    assert any("excluded as embeddings" in note for note in data["notes"])


def test_assume_plain_projects_guessed_weights_as_plain(mixed, capsys):
    model, _ = mappable_mixed(mixed)
    state = nwp.plain_state_dict(model)
    torch.save(state, "mixed.pt")
    code, out, _ = run(capsys, "project", "mixed.pt", "-o", "out.pt", "--assume-plain", "--json")
    written = load("out.pt")
    assert code == 0
    for name in ("embed.weight", *GUESSED, "head.weight"):
        assert torch.equal(written[name], project(state[name], Layout(), nwp.H1V1)), name
    assert not torch.equal(written["embed.weight"], state["embed.weight"])
    assert all(same_bits(written[k], state[k]) for k in state if k.endswith("bias"))
    layouts = {w["name"]: w["layout"] for w in json.loads(out)["weights"]}
    assert layouts == {"embed.weight": "assumed", **dict.fromkeys(GUESSED, "assumed"), "head.weight": "exact"}


def test_model_gives_exact_layouts_and_changes_nothing_on_a_mappable_model(mixed, capsys):
    model, reg = mappable_mixed(mixed)
    state = nwp.plain_state_dict(model)
    torch.save(state, "mixed.pt")
    code, out, _ = run(capsys, "check", "mixed.pt", "--model", "mixed_mod:build", "--json")
    data = json.loads(out)
    assert code == 0 and data["mappable"] is True
    assert {row["name"]: (row["layout"], row["groups"], row["transposed"]) for row in data["rows"]} == {
        "grouped.weight": ("exact", 4, False),
        "depthwise.weight": ("exact", 8, False),
        "up.weight": ("exact", 2, True),
        "head.weight": ("exact", 1, False),
    }
    assert run(capsys, "project", "mixed.pt", "-o", "out.pt", "--model", "mixed_mod:build")[0] == 0
    written = load("out.pt")
    assert list(written) == list(state) and all(same_bits(written[k], state[k]) for k in state)


def test_registered_checkpoint_gives_exact_layouts_without_model(mixed, capsys):
    model = reset_scaled(mixed.build(), 4, 1)
    reg = nwp.register(model)
    torch.save(model.state_dict(), "registered.pt")
    code, out, _ = run(capsys, "check", "registered.pt", "--json")
    data = json.loads(out)
    expected = reg.report()
    assert code == 1 and [row["name"] for row in data["rows"]] == reg.names
    assert all(row["layout"] == "exact" for row in data["rows"])
    for row, reference in zip(data["rows"], expected.rows):
        assert (row["block_columns"], row["mixed_block_columns"]) == (reference.block_columns, reference.mixed_block_columns)
    assert any("embed.weight" in note and "not tracked" in note for note in data["notes"])
    assert run(capsys, "project", "registered.pt", "-o", "out.pt")[0] == 0
    reg.project_()
    written = load("out.pt")
    assert list(written) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert (torch.equal(written[key], value) if torch.is_tensor(value) else written[key] == value), key
    fresh = mixed.build()
    nwp.register(fresh)
    fresh.load_state_dict(written)  # strict, with its descriptions
    assert nwp.registry_of(fresh).is_mappable()
    assert run(capsys, "check", "out.pt")[0] == 0


def test_plain_output_loads_into_the_plain_model_strictly(mixed, capsys):
    model = reset_scaled(mixed.build(), 4, 2)
    reg = nwp.register(model)
    torch.save(model.state_dict(), "registered.pt")
    assert run(capsys, "project", "registered.pt", "--plain", "-o", "deploy.pt")[0] == 0
    plain_model = mixed.build()
    plain_model.load_state_dict(load("deploy.pt"), strict=True)
    reg.project_()
    for key, value in nwp.plain_state_dict(model).items():
        assert torch.equal(plain_model.state_dict()[key], value), key


def test_plain_writes_only_the_state_dict_of_a_container(mixed, capsys):
    model = reset_scaled(mixed.build(), 4, 3)
    nwp.register(model)
    torch.save({"state_dict": model.state_dict(), "epoch": 7, "optimizer_states": [{"lr": 0.1}]}, "run.ckpt")
    assert run(capsys, "project", "run.ckpt", "--plain", "-o", "deploy.ckpt")[0] == 0
    mixed.build().load_state_dict(load("deploy.ckpt"), strict=True)  # its weights under no common prefix: all of it


def test_plain_refuses_a_parametrization_after_nwave_params(tmp_path, capsys):
    class Shift(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("offset", torch.zeros(()))

        def forward(self, x):
            return x + self.offset

    model = nn.Sequential(nn.Linear(3, 3))
    nwp.register(model)
    parametrize.register_parametrization(model[0], "weight", Shift())
    torch.save(model.state_dict(), tmp_path / "late.pt")
    line = error(capsys, "project", tmp_path / "late.pt", "--plain", "-o", tmp_path / "out.pt")
    assert line.startswith("nwave-param: error: --plain: 0.weight") and not (tmp_path / "out.pt").exists()


def _net():
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def test_plain_writes_the_inner_model_of_a_real_lightning_checkpoint(tmp_path, capsys):
    L = pytest.importorskip("lightning", reason=not_installed("lightning"))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = scaled(_net(), 4.0)
            self.reg = nwp.register(self.net)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y) + self.reg.penalty()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    module = Module()
    module.reg.harden(0.5)
    data = torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    code, out, _ = run(capsys, "project", tmp_path / "run.ckpt", "--plain", "-o", tmp_path / "deploy.pt")
    assert code == 0 and "under net. without it" in out
    written = load(tmp_path / "deploy.pt")
    plain = _net()
    plain.load_state_dict(written, strict=True)  # exactly the inner model's keys
    assert sorted(written) == sorted(plain.state_dict())
    module.reg.project_()
    x = torch.randn(5, 6)
    assert torch.equal(plain(x), module.net.eval()(x))  # and what the projected model computes


def test_plain_writes_the_inner_model_of_an_averaged_model(tmp_path, capsys):
    from torch.optim.swa_utils import AveragedModel

    model = scaled(_net(), 4.0)
    reg = nwp.register(model)
    average = AveragedModel(model)
    average.update_parameters(model)
    torch.save(average.state_dict(), tmp_path / "swa.pt")
    code, out, _ = run(capsys, "project", tmp_path / "swa.pt", "--plain", "-o", tmp_path / "deploy.pt", "--json")
    assert code == 0 and any("n_averaged" in note for note in json.loads(out)["notes"])
    plain = _net()
    plain.load_state_dict(load(tmp_path / "deploy.pt"), strict=True)
    reg.project_()
    x = torch.randn(5, 6)
    assert torch.equal(plain(x), model(x))


def test_prefix_chooses_the_keys_plain_writes(tmp_path, capsys):
    model = nn.Module()
    model.net, model.scale = scaled(_net(), 4.0), nn.Parameter(torch.ones(3))  # a key outside net.
    nwp.register(model.net)
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "run.ckpt")
    out_path = tmp_path / "deploy.pt"
    line = error(capsys, "project", tmp_path / "run.ckpt", "--plain", "-o", out_path)
    assert "all under net." in line and "scale" in line and "--prefix" in line and "prefix net." in line and "''" in line
    assert not out_path.exists()
    assert run(capsys, "project", tmp_path / "run.ckpt", "--plain", "--prefix", "net", "-o", out_path)[0] == 0
    _net().load_state_dict(load(out_path), strict=True)
    assert run(capsys, "project", tmp_path / "run.ckpt", "--plain", "--prefix", "", "-o", out_path)[0] == 0
    everything = nn.Module()
    everything.net, everything.scale = _net(), nn.Parameter(torch.ones(3))
    everything.load_state_dict(load(out_path), strict=True)
    assert "no key" in error(capsys, "project", tmp_path / "run.ckpt", "--plain", "--prefix", "head.", "-o", out_path)
    assert "pass --plain too" in error(capsys, "project", tmp_path / "run.ckpt", "--prefix", "net.", "-o", out_path)


def test_a_bare_state_dict_is_its_own_model_and_keeps_its_prefix(tmp_path, capsys):
    model = nn.Module()
    model.body = scaled(_net(), 4.0)  # every key under body.: the model's own, not a wrapper's
    nwp.register(model)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert run(capsys, "project", tmp_path / "model.pt", "--plain", "-o", tmp_path / "deploy.pt")[0] == 0
    plain = nn.Module()
    plain.body = _net()
    plain.load_state_dict(load(tmp_path / "deploy.pt"), strict=True)


# --- the report and projection, as Python computes them --------------------------------------------


def test_check_json_matches_registry_report(plain, capsys):
    code, out, _ = run(capsys, "check", plain, "--json")
    data = json.loads(out)
    expected = nwp.register(make_model()).report()
    assert code == 1 and data["mappable"] is False and data["notes"] == []
    assert [w["name"] for w in data["rows"]] == [r.name for r in expected.rows]
    for row, reference in zip(data["rows"], expected.rows):
        assert row["layout"] == "exact"
        assert (row["mixed_block_columns"], row["out_of_range"], row["block_columns"]) == (
            reference.mixed_block_columns, reference.out_of_range, reference.block_columns
        )
        assert row["topology"] == pytest.approx(reference.topology)
    assert [row["gates"] for row in data["rows"]] == [1, 4, 4, 1, 4, 4, 1, 1]


def test_project_writes_python_projection_and_keeps_everything_else(plain, tmp_path, capsys):
    out_path = tmp_path / "projected.pt"
    code, out, _ = run(capsys, "project", plain, "-o", out_path)
    assert code == 0 and "NOT mappable" in out and f"wrote {out_path}" in out
    original, projected = load(plain), load(out_path)
    assert list(projected) == list(original)
    model = make_model()
    nwp.register(model).project_()
    expected = nwp.plain_state_dict(model)
    for key in original:
        assert torch.equal(projected[key], expected[key]), key
        if "bias" in key:
            assert same_bits(projected[key], original[key])
    assert run(capsys, "check", out_path)[0] == 0


def test_project_json_reports_what_changed_per_weight(plain, tmp_path, capsys):
    code, out, _ = run(capsys, "project", plain, "-o", tmp_path / "out.pt", "--json")
    data = json.loads(out)  # stdout holds the JSON alone
    original, written = load(plain), load(tmp_path / "out.pt")
    assert code == 0 and data["before"]["mappable"] is False and data["after"]["mappable"] is True
    for entry in data["weights"]:
        old, new = original[entry["name"]].double(), written[entry["name"]].double()
        assert entry["changed"] == int((old != new).sum()) and entry["numel"] == old.numel()
        assert entry["l1_change"] == pytest.approx(float((old - new).abs().sum()))
        assert entry["max_change"] == pytest.approx(float((old - new).abs().max()))
    assert sum(entry["changed"] for entry in data["weights"]) > 0


def test_lightning_container_keeps_its_other_entries(tmp_path, capsys):
    model = make_model()
    reg = nwp.register(model)
    path, out_path = tmp_path / "lightning.ckpt", tmp_path / "out.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 7, "optimizer_states": [{"lr": 0.1}]}, path)
    assert [w["name"] for w in json.loads(run(capsys, "check", path, "--json")[1])["rows"]] == reg.names
    assert run(capsys, "project", path, "-o", out_path)[0] == 0
    written = load(out_path)
    assert written["epoch"] == 7 and written["optimizer_states"] == [{"lr": 0.1}]
    assert list(written["state_dict"]) == list(model.state_dict())
    fresh = make_model()
    nwp.register(fresh)
    fresh.load_state_dict(written["state_dict"])
    assert nwp.registry_of(fresh).is_mappable()


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
    torch.save({"0.weight": weight, "1.weight": weight.clone()}, path)  # tied in the model, not in the file
    # float64 values above the limit by 1e-10 stay out of range: the model's float32 is not used
    assert run(capsys, "check", path, "--model", "tied_mod:build")[0] == 1
    assert run(capsys, "project", path, "-o", out_path, "--model", "tied_mod:build")[0] == 0
    written = load(out_path)
    assert written["0.weight"].dtype == torch.float64 and torch.equal(written["0.weight"], written["1.weight"])
    assert torch.equal(written["0.weight"], project(weight, Layout(), nwp.H1V1))
    assert run(capsys, "check", out_path, "--model", "tied_mod:build")[0] == 0


def test_model_whose_layout_contradicts_the_description_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "wrong_mod.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.ConvTranspose1d(4, 4, 1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = nn.Sequential(nn.Conv1d(4, 4, 1))  # the same weight shape
    nwp.register(model)
    torch.save(model.state_dict(), tmp_path / "conv.pt")
    line = error(capsys, "check", tmp_path / "conv.pt", "--model", "wrong_mod:build")
    assert "0.weight" in line and "transposed=True" in line and "transposed=False" in line
    (tmp_path / "small_mod.py").write_text("from torch import nn\ndef build():\n    return nn.Sequential(nn.Conv1d(4, 2, 1))\n")
    line = error(capsys, "check", tmp_path / "conv.pt", "--model", "small_mod:build")
    assert "does not fit the model" in line and "0.weight (4, 4, 1) in the file, (2, 4, 1) in the model" in line


# --- storage sharing ---------------------------------------------------------------------------


def test_ties_and_views_survive_and_are_projected_consistently(tmp_path, capsys):
    torch.manual_seed(0)
    base, tied = torch.randn(10, 6) * 3, torch.randn(5, 4) * 3
    state = {"a.weight": base, "b.weight": base[5:], "c.weight": tied, "d.weight": tied}  # b: the second block of a
    torch.save(state, tmp_path / "shared.pt")
    code, out, _ = run(capsys, "project", tmp_path / "shared.pt", "-o", tmp_path / "out.pt", "--json")
    written = load(tmp_path / "out.pt")
    assert code == 0 and [w["name"] for w in json.loads(out)["weights"]] == ["a.weight", "b.weight", "c.weight"]
    a, b = written["a.weight"], written["b.weight"]
    assert b.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() and b.storage_offset() == 5 * 6
    assert torch.equal(a, project(base, Layout(), nwp.H1V1)) and torch.equal(b, project(base[5:], Layout(), nwp.H1V1))
    assert written["c.weight"].untyped_storage().data_ptr() == written["d.weight"].untyped_storage().data_ptr()
    assert torch.equal(written["d.weight"], project(tied, Layout(), nwp.H1V1))


def test_views_whose_projections_disagree_are_refused(tmp_path, capsys):
    base = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0], [-1.0, 1.0]]) * 0.5
    torch.save({"a.weight": base, "b.weight": base[3:]}, tmp_path / "shared.pt")  # b cuts a's block in two
    line = error(capsys, "project", tmp_path / "shared.pt", "-o", tmp_path / "out.pt")
    assert "a.weight, b.weight share memory" in line and not (tmp_path / "out.pt").exists()


def test_a_container_held_twice_stays_one(tmp_path, capsys):
    weight = torch.full((5, 3), 2.0)
    inner = {"fc.weight": weight}
    torch.save({"state_dict": inner, "averages": [inner, inner]}, tmp_path / "twice.pt")
    assert run(capsys, "project", tmp_path / "twice.pt", "-o", tmp_path / "out.pt")[0] == 0
    written = load(tmp_path / "out.pt")
    assert written["averages"][0] is written["averages"][1] is written["state_dict"]
    assert torch.equal(written["state_dict"]["fc.weight"], project(weight, Layout(), nwp.H1V1))


def test_a_tensor_sharing_memory_with_a_weight_follows_it(tmp_path, capsys):
    flat = torch.linspace(-2, 2, 60)
    torch.save({"flat": flat, "fc.weight": flat.view(10, 6)}, tmp_path / "flat.pt")
    code, out, _ = run(capsys, "project", tmp_path / "flat.pt", "-o", tmp_path / "out.pt")
    written = load(tmp_path / "out.pt")
    assert code == 0 and "note: changed with the weights they share memory with: flat" in out
    assert written["flat"].untyped_storage().data_ptr() == written["fc.weight"].untyped_storage().data_ptr()
    assert torch.equal(written["flat"], project(flat.view(10, 6), Layout(), nwp.H1V1).reshape(-1))


# --- the property: nothing changes but tracked weights, each to its Python projection ------------


LAYERS = {
    "linear": lambda: nn.Linear(6, 7),
    "conv": lambda: nn.Conv1d(6, 6, 2, groups=3),
    "convt": lambda: nn.ConvTranspose1d(6, 4, 2, groups=2),
    "pointwise": lambda: nn.Conv1d(6, 5, 1),
    "lstm": lambda: nn.LSTM(6, 3),
    "gru": lambda: nn.GRU(6, 4),
    "embed": lambda: nn.Embedding(5, 6),
}


@settings(max_examples=50)
@given(
    kinds=st.lists(st.sampled_from(sorted(LAYERS)), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    factor=st.sampled_from([0.3, 1.0, 4.0]),
    spec=st.builds(
        nwp.ChipSpec, limit=st.sampled_from([0.5, 0.9, 1.66]), group_size=st.sampled_from([1, 2, 5]), bits=st.sampled_from([None, 3])
    ),
    registered=st.booleans(),
    assume_plain=st.booleans(),
)
def test_property_project_changes_only_tracked_weights_to_their_projection(
    tmp_path_factory, kinds, seed, factor, spec, registered, assume_plain
):
    directory = tmp_path_factory.mktemp("property")
    model = reset_scaled(nn.ModuleDict({f"{kind}{i}": LAYERS[kind]() for i, kind in enumerate(kinds)}), factor, seed)
    layouts = {}  # what Python tracks, and how it reads each weight
    if nwp.trackable_weights(model):
        truth = nwp.register(model, spec)
        layouts = dict(zip(truth.names, truth.layouts))
        if not registered:
            truth.remove()
    registered = registered and bool(layouts)
    state = model.state_dict()
    torch.save(state, directory / "in.pt")
    options = [] if registered else ["--limit", spec.limit, "--group-size", spec.group_size]
    options += ["--bits", spec.bits] if spec.bits and not registered else []
    argv = ["project", directory / "in.pt", "-o", directory / "out.pt", *options, *(["--assume-plain"] if assume_plain else [])]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main([str(a) for a in argv])

    def embedding(key):
        return weight_name(key).startswith("embed")

    def guessed(key):  # read as plain without knowing
        return not registered and (state[key].dim() > 2 or embedding(key))

    read = [
        k for k, v in state.items() if torch.is_tensor(v) and v.dim() >= 2 and (registered or assume_plain or not embedding(k))
    ]
    changed_if_plain = [k for k in read if guessed(k) and not torch.equal(project(state[k], Layout(), spec), state[k])]
    if code == 2:  # refused, for a reason, and nothing was written
        reason = err.getvalue()
        assert not (directory / "out.pt").exists()
        guessing = "guessed" in reason and changed_if_plain and not assume_plain
        assert guessing or ("no trackable weight" in reason and not read), reason
        return
    assert code == 0 and (assume_plain or not changed_if_plain)
    written = load(directory / "out.pt")
    assert list(written) == list(state)
    for key, old in state.items():
        new = written[key]
        if not torch.is_tensor(old):
            assert new == old
        elif not same_bits(new, old):
            if guessed(key):  # accepted with --assume-plain only
                assert assume_plain and torch.equal(new, project(old, Layout(), spec)), key
            else:
                assert weight_name(key) in layouts, f"{key} changed but Python does not track it"
                assert torch.equal(new, project(old, layouts[weight_name(key)], spec)), key


# --- safetensors -------------------------------------------------------------------------------


def _registered_safetensors_source(mixed):
    model = reset_scaled(mixed.build(), 4, 4)
    model.head.double()
    reg = nwp.register(model, nwp.H1V2)
    return model, reg


def test_safetensors_round_trip_values_dtypes_and_metadata(mixed, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason=NEEDS_SAFETENSORS)
    model, reg = _registered_safetensors_source(mixed)
    torch.save(model.state_dict(), "registered.pt")
    assert run(capsys, "project", "registered.pt", "-o", "chip.safetensors")[0] == 0
    with safetensors.safe_open("chip.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    reg.project_()
    state = model.state_dict()
    for key, value in state.items():
        if torch.is_tensor(value):
            assert same_bits(tensors[key], value.contiguous()), key
        else:  # the descriptions travel in the metadata
            assert json.loads(metadata[key]) == value
    assert tensors["head.parametrizations.weight.original"].dtype == torch.float64
    data = json.loads(run(capsys, "check", "chip.safetensors", "--json")[1])
    assert data["mappable"] is True and data["spec"]["limit"] == 1.66
    assert all(row["layout"] == "exact" for row in data["rows"])
    assert sorted(r["name"] for r in data["rows"]) == sorted(reg.names)  # safetensors sorts its keys
    # and back to .pt: the descriptions return to the state_dict, a registered model loads it
    assert run(capsys, "project", "chip.safetensors", "-o", "back.pt")[0] == 0
    fresh = mixed.build()
    fresh.head.double()
    nwp.register(fresh, nwp.H1V2)
    fresh.load_state_dict(load("back.pt"))
    assert all(same_bits(fresh.state_dict()[k], v) for k, v in state.items() if torch.is_tensor(v))


def test_safetensors_keeps_unchanged_tensors_bit_identical_and_its_metadata(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason=NEEDS_SAFETENSORS)
    torch.manual_seed(0)
    tensors = {
        "fc.weight": torch.randn(6, 4, dtype=torch.bfloat16) * 3,
        "fc.bias": torch.randn(6, dtype=torch.float16),
        "scale": torch.tensor([float("nan"), -0.0]),
        "steps": torch.tensor([3], dtype=torch.int64),
        "q": torch.zeros(3, dtype=torch.float8_e4m3fn),
    }
    safetensors.save_file(tensors, tmp_path / "in.safetensors", metadata={"format": "pt", "author": "me"})
    assert run(capsys, "project", tmp_path / "in.safetensors", "-o", tmp_path / "out.safetensors")[0] == 0
    with safetensors.safe_open(tmp_path / "out.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "author": "me"}
        written = {k: handle.get_tensor(k) for k in handle.keys()}
    assert torch.equal(written["fc.weight"], project(tensors["fc.weight"], Layout(), nwp.H1V1))
    assert all(same_bits(written[k], tensors[k]) for k in ("fc.bias", "scale", "steps", "q"))


def test_safetensors_plain_output_loads_into_the_plain_model(mixed, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason=NEEDS_SAFETENSORS)
    model, _ = _registered_safetensors_source(mixed)
    torch.save(model.state_dict(), "registered.pt")
    assert run(capsys, "project", "registered.pt", "--plain", "-o", "deploy.safetensors")[0] == 0
    plain_model = mixed.build()
    plain_model.head.double()
    plain_model.load_state_dict(safetensors.load_file("deploy.safetensors"), strict=True)
    with safetensors.safe_open("deploy.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_safetensors_refuses_non_tensor_entries_and_copies_ties(plain, tmp_path, capsys):
    pytest.importorskip("safetensors.torch", reason=NEEDS_SAFETENSORS)
    torch.save({"state_dict": load(plain), "epoch": 3}, tmp_path / "run.ckpt")
    line = error(capsys, "project", tmp_path / "run.ckpt", "-o", tmp_path / "out.safetensors")
    assert "only tensors" in line and "'epoch'" in line and not (tmp_path / "out.safetensors").exists()
    weight = torch.full((5, 3), 0.5)
    torch.save({"a.weight": weight, "b.weight": weight}, tmp_path / "tied.pt")
    code, out, _ = run(capsys, "project", tmp_path / "tied.pt", "-o", tmp_path / "tied.safetensors")
    assert code == 0 and "separate, equal copies" in out and "a.weight, b.weight" in out
    torch.save({"fc.weight": weight, "mask": torch.eye(3).to_sparse()}, tmp_path / "sparse.pt")
    line = error(capsys, "project", tmp_path / "sparse.pt", "-o", tmp_path / "sparse.safetensors")
    assert "only dense tensors, not mask" in line and not (tmp_path / "sparse.safetensors").exists()
    assert leftovers(tmp_path) == []


def test_safetensors_without_the_package_says_how_to_install_it(plain, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    (tmp_path / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert "pip install 'nwave-param[safetensors]'" in error(capsys, "check", tmp_path / "x.safetensors")
    assert "pip install 'nwave-param[safetensors]'" in error(capsys, "project", plain, "-o", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_a_bad_safetensors_file_is_not_a_checkpoint(tmp_path, capsys):
    safetensors = pytest.importorskip("safetensors.torch", reason=NEEDS_SAFETENSORS)
    (tmp_path / "bad.safetensors").write_text("not a tensor in sight\n")
    assert "not a PyTorch or safetensors checkpoint" in error(capsys, "check", tmp_path / "bad.safetensors")
    safetensors.save_file({"fc.weight": torch.zeros(2, 2)}, tmp_path / "misnamed.pt")
    assert "name it *.safetensors" in error(capsys, "check", tmp_path / "misnamed.pt")


# --- options -----------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"nwave-param {nwp.__version__}"


def test_exclude_is_repeatable_and_never_swallows_the_checkpoint(plain, capsys):
    code, out, _ = run(capsys, "check", "--exclude", "1.*", "--exclude", "2.*", plain, "--json")
    data = json.loads(out)
    assert [row["name"] for row in data["rows"]] == ["0.weight"] and data["notes"] == []
    notes = json.loads(run(capsys, "check", "--exclude", "nothing.*", plain, "--json")[1])["notes"]
    assert notes == ["exclude pattern 'nothing.*' matches no trackable weight"]
    assert "no trackable weight" in error(capsys, "check", plain, "--exclude", "*")


def test_exclude_matches_weight_names_of_registered_checkpoints(tmp_path, capsys):
    model = make_model()
    nwp.register(model)
    torch.save(model.state_dict(), tmp_path / "registered.pt")
    data = json.loads(run(capsys, "check", tmp_path / "registered.pt", "--exclude", "0.weight", "--json")[1])
    assert "0.weight" not in [w["name"] for w in data["rows"]] and data["notes"] == []


def test_json_alone_prints_json_and_never_takes_the_checkpoint(plain, tmp_path, capsys):
    code, out, _ = run(capsys, "check", "--json", plain)
    assert code == 1 and json.loads(out)["mappable"] is False
    code, out, _ = run(capsys, "check", plain, f"--json={tmp_path / 'report.json'}")
    assert code == 1 and "NOT mappable" in out and "total" in out  # the text, and the file too
    assert json.loads((tmp_path / "report.json").read_text()) == json.loads(run(capsys, "check", plain, "--json")[1])
    assert "--json=PATH" in usage_error(capsys, "check", plain, "--json", tmp_path / "other.json")
    assert not (tmp_path / "other.json").exists()
    code, out, _ = run(capsys, "project", plain, "-o", tmp_path / "out.pt", f"--json={tmp_path / 'changes.json'}")
    assert code == 0 and "wrote" in out and json.loads((tmp_path / "changes.json").read_text())["weights"]


def test_demo_json_means_the_same(capsys, monkeypatch, tmp_path):
    from nwave_param import demo

    def fake_main(epochs, json_path, plot_path, chip, bits, mismatch, task, seed):  # demo.main's contract
        data = {"epochs": epochs, "plot": plot_path, "chip": chip, "bits": bits, "mismatch": mismatch, "task": task, "seed": seed}
        print("the demo's table", file=sys.stderr if json_path == "-" else sys.stdout)
        if json_path == "-":
            print(json.dumps(data))
        else:
            with open(json_path, "w") as stream:
                json.dump(data, stream)
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    code, out, err = run(capsys, "demo", "--quick", "--json")
    expected = {"epochs": 3, "plot": None, "chip": "h1v2", "bits": None, "mismatch": 0.0, "task": "digits", "seed": 0}  # the kit's H1v2, digits
    assert code == 0 and json.loads(out) == expected and "the demo's table" in err
    for form in (["--json", tmp_path / "a.json"], [f"--json={tmp_path / 'b.json'}"]):
        code, out, _ = run(capsys, "demo", "--epochs", "2", "--chip", "H1V1", "--bits", "5", "--mismatch", "0.02", "--task", "digits", "--seed", "3", *form)
        assert code == 0 and "the demo's table" in out
    for name in ("a.json", "b.json"):
        assert json.loads((tmp_path / name).read_text()) == {"epochs": 2, "plot": None, "chip": "h1v1", "bits": 5, "mismatch": 0.02, "task": "digits", "seed": 3}
    code, out, _ = run(capsys, "demo", "--json")
    assert code == 0 and json.loads(out)["epochs"] is None  # the task's own number of epochs
    assert "--epochs" in error(capsys, "demo", "--epochs", "0")
    assert "--seed" in error(capsys, "demo", "--seed", "-1")
    assert "bits" in error(capsys, "demo", "--bits", "1")
    assert "mismatch" in error(capsys, "demo", "--mismatch", "-0.1")


def test_chip_limit_group_size_bits(plain, tmp_path, capsys):
    data = json.loads(run(capsys, "check", plain, "--json", "--chip", "H1V2")[1])
    assert data["spec"]["limit"] == 1.66 and data["spec"]["group_size"] == 5
    data = json.loads(run(capsys, "check", plain, "--json", "--limit", "100", "--group-size", "1")[1])
    assert data["mappable"] is True and data["spec"]["limit"] == 100.0
    data = json.loads(run(capsys, "check", plain, "--json", "--chip", "h1v2", "--bits", "4")[1])
    assert data["spec"] == {"limit": 1.66, "group_size": 5, "bits": 4, "mismatch": 0.0, "cores": [50, 50, 100], "inputs": 16, "reset": "subtract", "power": 2}
    assert data["totals"]["off_grid"] > 0
    assert run(capsys, "project", plain, "-o", tmp_path / "grid.pt", "--chip", "h1v2", "--bits", "4")[0] == 0
    assert run(capsys, "check", tmp_path / "grid.pt", "--chip", "h1v2", "--bits", "4")[0] == 0
    assert run(capsys, "check", tmp_path / "grid.pt", "--chip", "h1v2", "--bits", "3")[0] == 1
    assert "--limit -1.0: limit must be a finite number > 0" in error(capsys, "check", plain, "--limit", "-1")
    assert "--bits 1" in error(capsys, "check", plain, "--bits", "1")
    assert "invalid choice" in usage_error(capsys, "check", plain, "--chip", "h9")


def test_the_files_spec_is_the_default_and_options_override_it_with_a_note(tmp_path, capsys):
    model = make_model()
    nwp.register(model, nwp.ChipSpec(limit=1.66, group_size=3, bits=5))
    torch.save(model.state_dict(), tmp_path / "registered.pt")
    data = json.loads(run(capsys, "check", tmp_path / "registered.pt", "--json")[1])
    assert (data["spec"]["limit"], data["spec"]["group_size"], data["spec"]["bits"]) == (1.66, 3, 5) and data["notes"] == []
    data = json.loads(run(capsys, "check", tmp_path / "registered.pt", "--json", "--limit", "0.9")[1])
    assert (data["spec"]["limit"], data["spec"]["group_size"], data["spec"]["bits"]) == (0.9, 3, 5)
    assert any("saved with ChipSpec(limit=1.66, group_size=3, bits=5)" in note for note in data["notes"])


@pytest.mark.parametrize(
    "options, spec",
    [(["--chip", "h1v2"], nwp.H1V2), (["--bits", "5"], nwp.ChipSpec(bits=5)), (["--limit", "2", "--group-size", "3"], nwp.ChipSpec(limit=2.0, group_size=3))],
    ids=["chip", "bits", "limit-group-size"],
)
def test_project_with_another_spec_writes_descriptions_that_say_it(options, spec, tmp_path, capsys):
    model = make_model()
    reg = nwp.register(model)
    reg.harden(0.5)
    torch.save(model.state_dict(), tmp_path / "registered.pt")
    assert run(capsys, "project", tmp_path / "registered.pt", "-o", tmp_path / "out.pt", *options)[0] == 0
    assert run(capsys, "check", tmp_path / "out.pt")[0] == 0  # read with the spec its values are projected for
    fresh = make_model()
    fresh_reg = nwp.register(fresh, spec)
    with pytest.warns(UserWarning, match="hardness 0.5"):  # the saved hardness is kept
        fresh.load_state_dict(load(tmp_path / "out.pt"))
    assert fresh_reg.is_mappable()
    # --plain computes what that projected model computes: its hardness and spec, as the descriptions say
    assert run(capsys, "project", tmp_path / "registered.pt", "-o", tmp_path / "plain.pt", "--plain", *options)[0] == 0
    plain = make_model()
    plain.load_state_dict(load(tmp_path / "plain.pt"), strict=True)
    x = torch.randn(3, 4)
    assert torch.equal(plain.eval()[0](x), fresh.eval()[0](x))
    assert all(torch.equal(a, b) for a, b in zip(plain[1](plain[0](x))[0], fresh[1](fresh[0](x))[0]))


def test_a_version_0_2_description_is_rewritten_as_a_tensor(tmp_path, capsys):
    from nwave_param.description import decode

    model = make_model()
    reg = nwp.register(model)
    state = model.state_dict()
    for key in [k for k in state if k.endswith("_extra_state")]:
        saved = decode(state[key])
        spec = {"limit": saved.spec.limit, "group_size": saved.spec.group_size, "bits": None, "mismatch": 0.0}
        state[key] = {"format": "nwave_param/1", "layout": saved.layout.to_dict(), "spec": spec}
    torch.save(state, tmp_path / "old.pt")
    assert run(capsys, "project", tmp_path / "old.pt", "-o", tmp_path / "out.pt", "--chip", "h1v2")[0] == 0
    written = load(tmp_path / "out.pt")
    for key, layout in zip([k for k in state if k.endswith("_extra_state")], reg.layouts):
        assert decode(written[key]) == (layout, nwp.H1V2, 0.0), key
    assert run(capsys, "check", tmp_path / "out.pt")[0] == 0


def test_max_bytes_refuses_before_loading(plain, tmp_path, capsys):
    line = error(capsys, "check", plain, "--max-bytes", "1K")
    assert "more than --max-bytes 1.0 KiB" in line and str(plain) in line
    # a compressed archive is judged by what it unpacks to
    torch.save({"fc.weight": torch.zeros(256, 256)}, tmp_path / "zeros.pt")
    with zipfile.ZipFile(tmp_path / "zeros.pt") as source:
        with zipfile.ZipFile(tmp_path / "small.pt", "w", zipfile.ZIP_DEFLATED) as packed:
            for entry in source.infolist():
                packed.writestr(entry.filename, source.read(entry.filename))
    assert (tmp_path / "small.pt").stat().st_size < 16 * 1024
    assert "loading it takes 256." in error(capsys, "check", tmp_path / "small.pt", "--max-bytes", "64K")
    assert run(capsys, "check", tmp_path / "small.pt", "--max-bytes", "1M")[0] == 0
    # a legacy (pre-zip) file is not compressed: its size bounds its tensors
    torch.save(load(plain), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert "more than --max-bytes" in error(capsys, "check", tmp_path / "legacy.pt", "--max-bytes", "1K")
    assert run(capsys, "check", tmp_path / "legacy.pt")[0] == 1
    assert "--max-bytes" in usage_error(capsys, "check", plain, "--max-bytes", "lots")
    assert files.parse_size("1.5k") == 1536 and files.parse_size("4G") == 4 * 2**30 and files.parse_size("10") == 10


def test_max_bytes_counts_what_computing_materializes(tmp_path, capsys):
    weight = torch.full((400, 400), 0.5)  # 625 KiB, under two keys: counted once
    mask = torch.sparse_coo_tensor(torch.tensor([[0, 999_999], [0, 999_999]]), torch.ones(2), (1_000_000, 1_000_000))
    torch.save({"a.weight": weight, "b.weight": weight, "mask": mask}, tmp_path / "shared.pt")  # the mask: its parts
    assert run(capsys, "check", tmp_path / "shared.pt", "--max-bytes", "1M")[0] == 0
    torch.save({"a.weight": weight, "b.weight": weight.t()}, tmp_path / "two.pt")  # two views: each computed
    line = error(capsys, "check", tmp_path / "two.pt", "--max-bytes", "1M")
    assert "computing with its tensors takes 1.2 MiB" in line and "more than --max-bytes 1.0 MiB" in line


# --- failures: one line, exit 2, nothing written ---------------------------------------------------


def test_files_that_are_not_checkpoints(plain, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello world\n")
    assert "not a PyTorch or safetensors checkpoint" in error(capsys, "check", tmp_path / "notes.txt")
    assert "is a directory" in error(capsys, "check", tmp_path)
    assert "no such file" in error(capsys, "check", tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(plain.read_bytes()[:200])
    assert "not a readable" in error(capsys, "check", truncated)
    torch.save(make_model(), tmp_path / "full.pt")
    assert "pickled" in error(capsys, "check", tmp_path / "full.pt")
    torch.save({"step": torch.tensor(3), "scale": torch.ones(4)}, tmp_path / "foreign.pt")
    assert "no trackable weight" in error(capsys, "check", tmp_path / "foreign.pt")
    torch.save({"rnn.weight_ih_l0": torch.zeros(10, 3), "rnn.weight_hh_l0": torch.zeros(10, 5)}, tmp_path / "odd_rnn.pt")
    assert "fits no RNN" in error(capsys, "check", tmp_path / "odd_rnn.pt")


def test_float8_and_sparse_weights_are_named(tmp_path, capsys):
    state = {"fc.weight": torch.randn(4, 4).to(torch.float8_e4m3fn), "out.weight": torch.full((2, 4), 0.5)}
    torch.save(state, tmp_path / "f8.pt")
    line = error(capsys, "check", tmp_path / "f8.pt")
    assert "fc.weight has dtype torch.float8_e4m3fn" in line and "exclude fc.weight" in line
    assert "fc.weight" in error(capsys, "project", tmp_path / "f8.pt", "-o", tmp_path / "out.pt")
    assert run(capsys, "check", tmp_path / "f8.pt", "--exclude", "fc.weight")[0] == 0
    torch.save({"fc.weight": torch.eye(4).to_sparse()}, tmp_path / "sparse.pt")
    assert "fc.weight is a sparse tensor" in error(capsys, "check", tmp_path / "sparse.pt")
    assert not (tmp_path / "out.pt").exists()


def test_usage_errors_are_one_line(plain, capsys):
    assert "CHECKPOINT" in usage_error(capsys, "check")
    assert "-o/--output" in usage_error(capsys, "project", plain)
    line = usage_error(capsys, "check", plain, "--no-such\n\x1b[2Joption")
    assert "--no-such\\n\\x1b[2Joption" in line and "\x1b" not in line


def test_project_never_overwrites_its_input(plain, tmp_path, capsys):
    before = plain.read_bytes()
    assert "overwrite the input" in error(capsys, "project", plain, "-o", plain)
    (tmp_path / "link.pt").symlink_to(plain)
    assert "overwrite the input" in error(capsys, "project", plain, "-o", tmp_path / "link.pt")
    assert "overwrite the input" in error(capsys, "check", plain, f"--json={plain}")
    assert "name the same file" in error(capsys, "project", plain, "-o", tmp_path / "x", f"--json={tmp_path / 'x'}")
    assert plain.read_bytes() == before


def test_bad_destinations(plain, tmp_path, capsys):
    assert "is a directory" in error(capsys, "project", plain, "-o", tmp_path)
    assert "no directory" in error(capsys, "project", plain, "-o", tmp_path / "missing" / "out.pt")
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")
    assert "no such file" in error(capsys, "project", tmp_path / "missing.pt", "-o", existing)
    assert existing.read_bytes() == b"keep me"


def test_project_refuses_nonfinite_and_writes_nothing(tmp_path, capsys):
    state = make_model().state_dict()
    state["0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert "0.weight holds NaN" in error(capsys, "project", tmp_path / "nan.pt", "-o", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    code, out, _ = run(capsys, "check", tmp_path / "nan.pt", "--json")
    assert code == 1 and json.loads(out)["rows"][0]["nonfinite"] == 1


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_json_is_strict_and_says_what_was_not_finite(tmp_path, capsys):
    torch.save({"fc.weight": torch.full((5, 4), 1.7e308, dtype=torch.float64)}, tmp_path / "huge.pt")
    code, out, _ = run(capsys, "project", tmp_path / "huge.pt", "-o", tmp_path / "out.pt", "--json")
    change = _strict_json(out)["weights"][0]
    assert code == 0 and change["l1_change"] is None and change["not_finite"] == {"l1_change": "inf"}
    assert change["max_change"] == pytest.approx(1.7e308)
    row = _strict_json(run(capsys, "check", tmp_path / "huge.pt", "--json")[1])["rows"][0]
    assert row["magnitude"] is None and row["not_finite"]["magnitude"] == "inf" and row["nonfinite"] == 0
    state = {"fc.weight": torch.tensor([[float("nan"), 0.0], [float("-inf"), 0.0]])}
    torch.save(state, tmp_path / "nan.pt")
    assert run(capsys, "check", tmp_path / "nan.pt", f"--json={tmp_path / 'report.json'}")[0] == 1
    data = _strict_json((tmp_path / "report.json").read_text())
    assert data["rows"][0]["nonfinite"] == 2 and data["rows"][0]["not_finite"]["max_abs"] in ("nan", "inf")


def test_outputs_are_written_all_or_none(plain, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")
    unwritable = "/proc/report.json"  # no file can be made there, even by root
    line = error(capsys, "project", plain, "-o", existing, f"--json={unwritable}")
    assert f"cannot write {unwritable}" in line and "nothing was written" in line
    assert existing.read_bytes() == b"keep me" and leftovers(tmp_path) == []
    # the renames: if the second fails, the message says what was written and what was not
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    line = error(capsys, "project", plain, "-o", existing, f"--json={tmp_path / 'changes.json'}")
    assert f"wrote {existing}, but cannot write {tmp_path / 'changes.json'}" in line
    assert load(existing) and not (tmp_path / "changes.json").exists() and leftovers(tmp_path) == []


def test_names_from_the_file_are_escaped_in_the_text_and_exact_in_the_json(tmp_path, capsys):
    name = "evil\x1b[2J\n.weight"
    torch.save({name: torch.full((2, 2), 0.5), "an\x1b[31m.embed.weight": torch.ones(3, 2)}, tmp_path / "names.pt")
    code, out, _ = run(capsys, "check", tmp_path / "names.pt")
    assert code == 0 and "\x1b" not in out and "evil\\x1b[2J\\n.weight" in out
    assert "note: excluded as embeddings (nwave_param never tracks nn.Embedding): an\\x1b[31m.embed.weight" in out
    assert _strict_json(run(capsys, "check", tmp_path / "names.pt", "--json")[1])["rows"][0]["name"] == name
    code, out, _ = run(capsys, "project", tmp_path / "names.pt", "-o", tmp_path / "out.pt")
    assert code == 0 and "\x1b" not in out and out.count("evil\\x1b[2J\\n.weight") == 1


def test_a_weight_tied_across_layouts_is_refused_naming_both(tmp_path, capsys, monkeypatch):
    linear, cell = nn.Linear(4, 6), nn.GRUCell(4, 2)  # weight and weight_ih: both (6, 4)
    nwp.register(linear)
    nwp.register(cell)
    state = {**{f"fc.{k}": v for k, v in linear.state_dict().items()}, **{f"cell.{k}": v for k, v in cell.state_dict().items()}}
    state["cell.parametrizations.weight_ih.original"] = state["fc.parametrizations.weight.original"]
    torch.save(state, tmp_path / "tied.pt")
    for command in (["check"], ["project", "-o", tmp_path / "out.pt"]):
        line = error(capsys, *command[:1], tmp_path / "tied.pt", *command[1:])
        assert "fc.parametrizations.weight.original and cell.parametrizations.weight_ih.original" in line
        assert "different layouts" in line
    (tmp_path / "tied_layouts.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    model = nn.Module()\n"
        "    model.fc, model.cell = nn.Linear(4, 6), nn.GRUCell(4, 2)\n"
        "    model.cell.weight_ih = model.fc.weight\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.save(nn.Linear(4, 6).state_dict(), tmp_path / "plain.pt")
    line = error(capsys, "check", tmp_path / "plain.pt", "--model", "tied_layouts:build")
    assert "fc.weight and cell.weight_ih hold one Parameter" in line


@settings(max_examples=150)
@example(shape=[4, 1], gates=2, groups=1, transposed=True)  # the issue's: 4 input channels, 1 output row, 2 gates
@given(
    shape=st.lists(st.integers(0, 6), min_size=2, max_size=3),
    gates=st.integers(1, 4),
    groups=st.integers(1, 3),
    transposed=st.booleans(),
)
def test_property_a_described_layout_is_checked_in_full_before_any_math(tmp_path_factory, shape, gates, groups, transposed):
    from nwave_param.description import encode

    layout = Layout(gates, groups, transposed)
    path = tmp_path_factory.mktemp("layout") / "described.pt"
    torch.save({"fc.parametrizations.weight.original": torch.randn(shape) * 3,
                "fc.parametrizations.weight.0._extra_state": encode(layout, nwp.H1V1, 0.0)}, path)
    for argv in (["check", path], ["project", path, "-o", path.with_name("out.pt")]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main([str(a) for a in argv])
        assert code in (0, 1) or ("fc.weight of shape" in err.getvalue() and "cannot be read with" in err.getvalue()), err.getvalue()


def test_factory_prints_go_to_stderr_and_its_moves_are_undone(tmp_path, capfd, monkeypatch):
    (tmp_path / "chatty.py").write_text(
        "import os, sys\n"
        "from torch import nn\n"
        "print('import-time print')\n"
        "def build():\n"
        "    print('factory print')\n"
        "    os.system('echo from a child process')\n"
        "    os.chdir('/')\n"
        "    sys.path.append('/nowhere')\n"
        "    return nn.Sequential(nn.Linear(4, 6))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "chatty", raising=False)
    torch.save(nn.Sequential(nn.Linear(4, 6)).state_dict(), "model.pt")
    path = list(sys.path)
    code = main(["check", "model.pt", "--model", "chatty:build", "--json"])
    out, err = capfd.readouterr()
    assert code in (0, 1) and _strict_json(out)["rows"][0]["name"] == "0.weight"
    assert "import-time print" in err and "factory print" in err and "from a child process" in err
    assert os.getcwd() == str(tmp_path) and sys.path == path


def test_demo_paths_are_checked_before_training(capsys, monkeypatch, tmp_path):
    from nwave_param import demo

    def trains(*_):
        raise AssertionError("trained")

    monkeypatch.setattr(demo, "main", trains)
    for option in (f"--json={tmp_path / 'missing' / 'x.json'}", "--plot"):
        argv = ["demo", "--quick", option] + ([str(tmp_path / "missing" / "x.png")] if option == "--plot" else [])
        assert "no directory" in error(capsys, *argv)
    assert "is a directory" in error(capsys, "demo", "--quick", "--plot", tmp_path)


def test_unwritable_directory_fails_cleanly(plain, tmp_path, capsys):
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.geteuid() == 0:  # root ignores mode bits; no one creates files in /proc
        directory = "/proc"
    assert "cannot write" in error(capsys, "project", plain, "-o", os.path.join(directory, "out.pt"))
    assert not os.path.exists(os.path.join(directory, "out.pt"))


class _FullDisk(io.BytesIO):
    """A file on a disk that fills up after 1000 bytes."""

    def write(self, data):
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_full_disk_leaves_no_file_behind(plain, tmp_path, capsys, monkeypatch):
    real_fdopen = os.fdopen

    def fdopen(handle, *args, **kwargs):
        os.close(handle)
        return _FullDisk()

    monkeypatch.setattr(os, "fdopen", fdopen)
    line = error(capsys, "project", plain, "-o", tmp_path / "out.pt")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert "cannot write" in line and "No space left on device" in line and "nothing was written" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.pt").exists()


def test_a_signal_once_the_outputs_are_being_renamed_lets_the_command_complete(plain, tmp_path, capsys, monkeypatch):
    """Renaming has begun: stopping now would leave some outputs new and say nothing was written."""
    real_replace, before = os.replace, signal.getsignal(signal.SIGTERM)

    def replace(source, target):
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    code, out, err = run(capsys, "project", plain, "-o", tmp_path / "out.pt", f"--json={tmp_path / 'changes.json'}", "--chip", "h1v1")
    assert code == 0 and err == "" and "wrote" in out
    assert load(tmp_path / "out.pt") and json.loads((tmp_path / "changes.json").read_text())["weights"]
    assert signal.getsignal(signal.SIGTERM) is before  # and the handler is the caller's again


def test_ctrl_c_while_saving_leaves_the_old_output_and_no_file_behind(plain, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")

    def interrupted_save(obj, stream):
        stream.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    line = error(capsys, "project", plain, "-o", existing)
    assert "interrupted while writing" in line and existing.read_bytes() == b"keep me" and leftovers(tmp_path) == []


def test_output_mode_is_what_a_normal_write_gives(plain, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        assert run(capsys, "project", plain, "-o", tmp_path / "new.pt")[0] == 0
        replaced = tmp_path / "replaced.pt"
        replaced.write_bytes(b"old")
        replaced.chmod(0o604)
        assert run(capsys, "project", plain, "-o", replaced)[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o604 and load(replaced)


@pytest.mark.slow
def test_console_entry_point(plain):
    result = subprocess.run([sys.executable, "-m", "nwave_param", "check", "--json", str(plain), "--chip", "h1v1"], capture_output=True, text=True)
    assert result.returncode == 1 and json.loads(result.stdout)["mappable"] is False and result.stderr == ""


@pytest.mark.slow
@pytest.mark.parametrize("value, verdict", [(0.5, 0), (2.0, 1)], ids=["mappable", "not mappable"])
def test_a_closed_stdout_keeps_the_verdict(tmp_path, value, verdict):
    """``nwave-param check model.pt | head -n 1`` in a real shell: the report (1,500 weights, far
    more than a pipe holds) is cut by head, and the exit status is still the verdict, with nothing on stderr."""
    path = tmp_path / "many.pt"
    torch.save({f"fc{i}.weight": torch.full((5, 3), value) for i in range(1500)}, path)
    pipeline = f"'{sys.executable}' -m nwave_param check '{path}' --chip h1v1 | head -n 1; echo \"status ${{PIPESTATUS[0]}}\" >&2"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("limit 0.9, blocks of 5: ") and result.stdout.count("\n") == 1, result.stdout
    assert result.stderr == f"status {verdict}\n", result.stderr


@pytest.mark.slow
def test_project_into_a_closed_stdout_writes_its_output_and_exits_0(plain, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "nwave_param", "project", str(plain), "-o", str(tmp_path / "out.pt"), "--chip", "h1v1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    process.stdout.close()  # the reader is gone before anything is printed: `| head -n 0`
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and err == "", err
    written, expected = load(tmp_path / "out.pt"), nwp.project_state_dict(load(plain))[0]
    assert list(written) == list(expected) and all(same_bits(written[k], expected[k]) for k in expected)
    assert leftovers(tmp_path) == []


def test_importing_nwave_param_or_its_command_line_imports_no_torch():
    """The command line installs its signal handling before torch loads: nothing it imports first
    may import torch (or anything heavy)."""
    probe = (
        "import sys, nwave_param, nwave_param.checkpoints.cli\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'numpy', 'typing', 'argparse')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "[]\n", (result.stdout, result.stderr)


def test_every_public_name_is_imported_at_its_first_use_as_before():
    import importlib

    import nwave_param

    homes = {name: nwave_param._HOMES[name] for name in nwave_param.__all__}  # every name has a home, and only those
    assert set(nwave_param._HOMES) == set(nwave_param.__all__) and nwave_param.__version__ == "0.4.0"
    for name, home in homes.items():
        assert getattr(nwave_param, name) is getattr(importlib.import_module(f"nwave_param.{home}"), name), name
    from nwave_param import H1V2, register  # noqa: F401

    assert H1V2 is nwp.H1V2 and nwp.register is register
    assert nwave_param.functional.project is project and nwave_param.loss.__name__ == "nwave_param.loss"
    from nwave_param.loss import topology_loss, weight_magnitude_loss  # the vendor SDK's path: nwavesdk.loss

    assert (nwp.topology_loss, nwp.weight_magnitude_loss) == (topology_loss, weight_magnitude_loss)
    assert set(nwave_param.__all__) <= set(dir(nwave_param)) and "functional" in dir(nwave_param)
    with pytest.raises(AttributeError, match="module 'nwave_param' has no attribute 'nonsense'"):
        nwave_param.nonsense  # noqa: B018


DEFAULT_CHIP_NOTE = (
    "nwave-param: note: {path} does not say which chip it was trained for (a plain state_dict), so it was {done} "
    "the H1v1 chip (limit 0.9, blocks of 5); for the H1v2, pass --chip h1v2 (or --limit, --group-size, --bits)\n"
)


def test_a_plain_file_held_to_the_default_chip_says_so_on_stderr(plain, tmp_path, capsys):
    """The issue's: a plain file exported from an H1v2 model is "NOT mappable" against H1v1's limit,
    and a line says which chip was assumed and how to choose another; stdout stays the report, or strict JSON."""
    h1v2_trained = tmp_path / "h1v2.pt"
    torch.save({"fc.weight": torch.full((5, 3), 1.5)}, h1v2_trained)  # within H1v2's 1.66, beyond H1v1's 0.9
    code, out, err = run(capsys, "check", h1v2_trained)
    assert code == 1 and "NOT mappable" in out and err == DEFAULT_CHIP_NOTE.format(path=h1v2_trained, done="checked against")
    code, out, err = run(capsys, "check", h1v2_trained, "--json")
    assert code == 1 and _strict_json(out)["spec"]["limit"] == 0.9 and err == DEFAULT_CHIP_NOTE.format(path=h1v2_trained, done="checked against")
    assert run(capsys, "check", h1v2_trained, "--chip", "h1v2") == (0, run(capsys, "check", h1v2_trained, "--chip", "h1v2")[1], "")
    code, out, err = run(capsys, "project", plain, "-o", tmp_path / "out.pt")
    assert code == 0 and err == DEFAULT_CHIP_NOTE.format(path=plain, done="projected for")
    for chosen in (["--chip", "h1v1"], ["--limit", "0.9"], ["--group-size", "5"], ["--bits", "8"]):  # a chip chosen: no note
        assert run(capsys, "check", plain, *chosen)[2] == "", chosen
    model = nn.Sequential(nn.Linear(3, 5))
    nn.init.constant_(model[0].weight, 1.5)
    nwp.register(model, nwp.H1V2)
    torch.save(model.state_dict(), tmp_path / "registered.pt")  # says its own chip (H1v2): no note
    assert run(capsys, "check", tmp_path / "registered.pt") == (0, run(capsys, "check", tmp_path / "registered.pt")[1], "")
    assert "note" not in error(capsys, "project", plain, "-o", tmp_path / "missing" / "out.pt")  # an error stays one line


def test_the_demo_writes_its_json_and_picture_all_or_none(capsys, monkeypatch, tmp_path):
    """The picture fails half-way (a full disk, Ctrl-C): the JSON, complete by then, is not left
    behind either, nor any temporary file, and nothing was printed."""
    from nwave_param import demo

    class Trained:
        def to_dict(self):
            return {}

    def half_a_picture(outcomes, placement, stream, limit):
        stream.write(b"\x89PNG half")
        raise failure

    monkeypatch.setattr(demo, "run", lambda epochs, spec, task, seed: ({"hardened": Trained()}, Trained()))
    monkeypatch.setattr(demo, "plot", half_a_picture)
    for failure, said in ((OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"), (KeyboardInterrupt(), "interrupted while writing")):
        line = error(capsys, "demo", "--quick", f"--json={tmp_path / 'demo.json'}", "--plot", tmp_path / "demo.png")
        assert said in line and "nothing was written" in line, line
        assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)
