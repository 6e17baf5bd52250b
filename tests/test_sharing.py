"""Tensors that share memory in a checkpoint (nwave_param.sharing): ties and views survive a
projection, from Python and from the command line, and views whose projections disagree are
refused."""

import json

import torch
from commandline import error, load, run

import nwave_param as nwp
from nwave_param.functional import project
from nwave_param.layout import Layout


def test_ties_stay_ties_and_views_stay_views():
    shared = torch.full((5, 4), 2.0)
    state = {"a.weight": shared, "b.weight": shared, "c.weight": torch.full((10, 4), -3.0)}
    state["c.half"] = state["c.weight"][:5]  # a view of a weight, not itself tracked
    new, changes = nwp.project_state_dict(state)
    assert new["a.weight"] is new["b.weight"] and [c["name"] for c in changes] == ["a.weight", "c.weight"]
    assert new["c.half"].data_ptr() == new["c.weight"].data_ptr() and torch.equal(new["c.half"], new["c.weight"][:5])
    assert torch.equal(shared, torch.full((5, 4), 2.0))


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
