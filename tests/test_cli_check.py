"""``nwave-param check`` on real files in a temporary directory: the report as Python computes it,
the layouts it reads (exact or assumed), its options, its JSON, and what it refuses."""

import json

import pytest
import torch
from commandline import GUESSED, error, load, make_model, mappable_mixed, reset_scaled, run, strict_json, usage_error
from layers import same_bits
from torch import nn

import nwave_param as nwp


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


def test_chip_limit_group_size_bits(plain, tmp_path, capsys):
    data = json.loads(run(capsys, "check", plain, "--json", "--chip", "H1V2")[1])
    assert data["spec"]["limit"] == 1.66 and data["spec"]["group_size"] == 5
    data = json.loads(run(capsys, "check", plain, "--json", "--limit", "100", "--group-size", "1")[1])
    assert data["mappable"] is True and data["spec"]["limit"] == 100.0
    data = json.loads(run(capsys, "check", plain, "--json", "--chip", "h1v2", "--bits", "4")[1])
    assert data["spec"] == {
        "limit": 1.66, "group_size": 5, "bits": 4, "mismatch": 0.0, "cores": [50, 50, 100], "inputs": 16, "reset": "subtract", "power": 2
    }
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


def test_json_is_strict_and_says_what_was_not_finite(tmp_path, capsys):
    torch.save({"fc.weight": torch.full((5, 4), 1.7e308, dtype=torch.float64)}, tmp_path / "huge.pt")
    code, out, _ = run(capsys, "project", tmp_path / "huge.pt", "-o", tmp_path / "out.pt", "--json")
    change = strict_json(out)["weights"][0]
    assert code == 0 and change["l1_change"] is None and change["not_finite"] == {"l1_change": "inf"}
    assert change["max_change"] == pytest.approx(1.7e308)
    row = strict_json(run(capsys, "check", tmp_path / "huge.pt", "--json")[1])["rows"][0]
    assert row["magnitude"] is None and row["not_finite"]["magnitude"] == "inf" and row["nonfinite"] == 0
    state = {"fc.weight": torch.tensor([[float("nan"), 0.0], [float("-inf"), 0.0]])}
    torch.save(state, tmp_path / "nan.pt")
    assert run(capsys, "check", tmp_path / "nan.pt", f"--json={tmp_path / 'report.json'}")[0] == 1
    data = strict_json((tmp_path / "report.json").read_text())
    assert data["rows"][0]["nonfinite"] == 2 and data["rows"][0]["not_finite"]["max_abs"] in ("nan", "inf")


def test_names_from_the_file_are_escaped_in_the_text_and_exact_in_the_json(tmp_path, capsys):
    name = "evil\x1b[2J\n.weight"
    torch.save({name: torch.full((2, 2), 0.5), "an\x1b[31m.embed.weight": torch.ones(3, 2)}, tmp_path / "names.pt")
    code, out, _ = run(capsys, "check", tmp_path / "names.pt")
    assert code == 0 and "\x1b" not in out and "evil\\x1b[2J\\n.weight" in out
    assert "note: excluded as embeddings (nwave_param never tracks nn.Embedding): an\\x1b[31m.embed.weight" in out
    assert strict_json(run(capsys, "check", tmp_path / "names.pt", "--json")[1])["rows"][0]["name"] == name
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
    assert code == 1 and strict_json(out)["spec"]["limit"] == 0.9
    assert err == DEFAULT_CHIP_NOTE.format(path=h1v2_trained, done="checked against")
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
