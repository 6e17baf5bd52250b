"""Checkpoint files (nwave_param.checkpoints.files), through the command line: safetensors read and
written, ``--max-bytes`` checked before loading and before computing, files that are not
checkpoints."""

import json
import sys
import zipfile

import pytest
import torch
from commandline import error, leftovers, load, make_model, reset_scaled, run, usage_error
from layers import same_bits

import nwave_param as nwp
from nwave_param.checkpoints import files
from nwave_param.functional import project
from nwave_param.layout import Layout

NEEDS_SAFETENSORS = "the safetensors extra is not installed (pip install -e '.[safetensors]')"


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
