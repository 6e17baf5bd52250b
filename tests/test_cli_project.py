"""``nwave-param project`` on real files in a temporary directory: what it writes is the Python
projection of the tracked weights and nothing else, ``--plain`` writes what the plain model
loads, and guessed layouts are never changed without a flag."""

import contextlib
import io
import json
import os

import pytest
import torch
from commandline import GUESSED, error, leftovers, load, make_model, mappable_mixed, reset_scaled, run
from hypothesis import given, settings
from hypothesis import strategies as st
from installs import not_installed
from layers import same_bits, scaled, weight_name
from torch import nn
from torch.nn.utils import parametrize

import nwave_param as nwp
from nwave_param.checkpoints.cli import main
from nwave_param.functional import project
from nwave_param.layout import Layout

# --- the model: guessed layouts are never changed without a flag --------------------------


def test_guessed_layouts_without_model_exit_2_and_write_nothing(mixed, tmp_path, capsys):
    model, reg = mappable_mixed(mixed)
    torch.save(nwp.plain_state_dict(model), "mixed.pt")
    line = error(capsys, "project", "mixed.pt", "-o", "out.pt")
    assert "guessed" in line and "--assume-plain" in line and "--model" in line
    assert all(name in line for name in GUESSED) and "head.weight" not in line and "embed.weight" not in line
    assert not os.path.exists("out.pt") and leftovers(tmp_path) == []


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


# --- --plain: what the plain model loads ----------------------------------------------------------


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


# --- the projection, as Python computes it --------------------------------------------------------


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


# --- the property: nothing changes but tracked weights, each to its Python projection -------------


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


# --- the spec projected for, old descriptions, what is refused ------------------------------------


@pytest.mark.parametrize(
    "options, spec",
    [
        (["--chip", "h1v2"], nwp.H1V2),
        (["--bits", "5"], nwp.ChipSpec(bits=5)),
        (["--limit", "2", "--group-size", "3"], nwp.ChipSpec(limit=2.0, group_size=3)),
    ],
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


def test_project_refuses_nonfinite_and_writes_nothing(tmp_path, capsys):
    state = make_model().state_dict()
    state["0.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    assert "0.weight holds NaN" in error(capsys, "project", tmp_path / "nan.pt", "-o", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    code, out, _ = run(capsys, "check", tmp_path / "nan.pt", "--json")
    assert code == 1 and json.loads(out)["rows"][0]["nonfinite"] == 1
