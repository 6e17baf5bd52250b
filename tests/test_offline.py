"""nwp.check_state_dict and nwp.project_state_dict: a state_dict read without its model, against
the plain formulas of tests/reference.py, and the command line as a shell over them."""

import copy
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from layers import cloned_state, fill, group_sizes, limits, make_model, model_cfgs, same_bits, values_cfgs
from reference import ref_constraints_hold, ref_tracked
from torch import nn

import nwave_param as nwp
from nwave_param.checkpoints.cli import main
from nwave_param.layout import Layout

# kinds whose layouts a state_dict tells by names and shapes alone (exact without the model)
CERTAIN = ("linear", "lstm", "gru", "rnn", "lstmcell", "grucell", "rnncell")


def plain_model(kind, data, vcfg, limit):
    model = make_model(data.draw(model_cfgs(kind)))
    fill(model, vcfg, limit)
    return model


@pytest.mark.parametrize("kind", CERTAIN)
@settings(max_examples=15, deadline=None)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes)
def test_check_state_dict_reads_what_the_formulas_say(kind, data, vcfg, limit, group_size):
    model = plain_model(kind, data, vcfg, limit * data.draw(st.sampled_from([0.5, 1.0, 1.5])))
    spec = nwp.ChipSpec(limit=limit, group_size=group_size)
    state = model.state_dict()
    before = cloned_state(state)
    report = nwp.check_state_dict(state, spec)
    magnitude_ok, topology_ok = ref_constraints_hold(ref_tracked(model), limit, group_size)
    assert [row.name for row in report] == [name for name, _, _ in ref_tracked(model)]
    assert report.is_mappable == (magnitude_ok and topology_ok)
    assert all(same_bits(state[key], value) for key, value in before.items())  # read, never written


@pytest.mark.parametrize("kind", CERTAIN)
@settings(max_examples=15, deadline=None)
@given(data=st.data(), vcfg=values_cfgs, limit=limits, group_size=group_sizes)
def test_project_state_dict_is_project_of_each_weight_and_leaves_the_input(kind, data, vcfg, limit, group_size):
    model = plain_model(kind, data, vcfg, 2 * limit)
    spec = nwp.ChipSpec(limit=limit, group_size=group_size)
    state = model.state_dict()
    before = cloned_state(state)
    new, changes = nwp.project_state_dict(state, spec)
    reg = nwp.register(copy.deepcopy(model), spec)  # what the model itself would project to
    reg.project_()
    expected = dict(zip(reg.names, reg.latent_weights()))
    assert list(new) == list(state)
    for key in state:
        assert same_bits(new[key], expected[key] if key in expected else state[key]), key
        assert same_bits(state[key], before[key]), key
    for change in changes:
        old, projected = state[change["name"]], new[change["name"]]
        assert change["changed"] == int((old != projected).sum())
        assert change["l1_change"] == pytest.approx(float((old.double() - projected.double()).abs().sum()))
    assert nwp.check_state_dict(new, spec).is_mappable
    again, _ = nwp.project_state_dict(new, spec)
    assert all(same_bits(again[key], new[key]) for key in new)  # idempotent


def test_the_spec_the_checkpoint_was_saved_with_is_the_default():
    model = nn.Sequential(nn.Linear(4, 10), nn.Linear(10, 5))
    with torch.no_grad():
        model[0].weight.fill_(1.2)  # beyond H1v1's 0.9, within H1v2's 1.66
        model[1].weight.fill_(0.1)
    nwp.register(model, nwp.H1V2)
    state = model.state_dict()
    assert nwp.check_state_dict(state).spec == nwp.H1V2 and nwp.check_state_dict(state).is_mappable
    with pytest.warns(UserWarning, match="saved with"):
        assert not nwp.check_state_dict(state, nwp.H1V1).is_mappable
    new, _ = nwp.project_state_dict(state, nwp.H1V1)
    fresh = nn.Sequential(nn.Linear(4, 10), nn.Linear(10, 5))
    nwp.register(fresh, nwp.H1V1)
    fresh.load_state_dict(new)  # its descriptions now say H1v1, which a model registered for H1v1 accepts
    assert nwp.registry_of(fresh).is_mappable()


def test_the_model_gives_exact_layouts_and_is_left_as_it_was():
    model = nn.Sequential(nn.Conv1d(4, 10, 3, groups=2), nn.Linear(10, 5))
    with torch.no_grad():
        model[0].weight.mul_(20)
    state = model.state_dict()
    with pytest.raises(nwp.CheckpointError, match="guessed: 0.weight"):
        nwp.project_state_dict(state)  # a convolution read by its shape may be grouped
    other = nn.Sequential(nn.Conv1d(4, 10, 3, groups=2), nn.Linear(10, 5))  # the same model, its own values
    held = cloned_state(other)
    new, changes = nwp.project_state_dict(state, model=other)
    assert all(c["layout"] == "exact" for c in changes) and changes[0]["groups"] == 2
    assert all(same_bits(other.state_dict()[key], value) for key, value in held.items())
    assert list(other.state_dict()) == list(held)  # not registered: no key moved under parametrizations
    reg = nwp.register(other, nwp.H1V2).harden(0.5)  # a registered model is read the same way, and kept
    held = cloned_state(other)
    again, _ = nwp.project_state_dict(state, model=other)
    assert all(same_bits(again[key], value) for key, value in new.items())
    assert all(same_bits(other.state_dict()[key], value) for key, value in held.items())
    assert reg.hardness == 0.5 and reg.spec == nwp.H1V2 and reg.penalty().isfinite()
    model.load_state_dict(new)
    assert nwp.register(model).is_mappable()


def test_refusals_name_the_weight_and_change_nothing():
    state = {"fc.weight": torch.full((5, 3), 2.0), "out.weight": torch.full((5, 3), 2.0)}
    state["out.weight"][0, 0] = float("nan")
    before = cloned_state(state)
    with pytest.raises(nwp.CheckpointError, match=r"out.weight holds NaN.*nothing was changed") as refused:
        nwp.project_state_dict(state)
    assert "\n" not in str(refused.value) and isinstance(refused.value, ValueError)
    assert all(same_bits(state[key], value) for key, value in before.items())
    with pytest.raises(nwp.CheckpointError, match="expanded tensor"):
        nwp.check_state_dict({"fc.weight": torch.ones(1, 3).expand(5, 3)})
    with pytest.raises(nwp.CheckpointError, match="no trackable weight"):
        nwp.check_state_dict({"bias": torch.ones(3)})
    with pytest.raises(TypeError, match="ChipSpec"):
        nwp.check_state_dict(state, "h1v2")


def test_what_the_reading_noticed_is_a_warning():
    state = {"fc.weight": torch.zeros(5, 3), "embed.weight": torch.zeros(7, 3)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = nwp.check_state_dict(state, exclude="nothing.*")
    messages = [str(w.message) for w in caught]
    assert [row.name for row in report] == ["fc.weight"]
    assert any("'nothing.*' matches no trackable weight" in m for m in messages)
    assert any(
        w.category is nwp.CheckpointWarning and "excluded as embeddings" in str(w.message) and "embed.weight" in str(w.message)
        for w in caught
    )
    assert [row.name for row in nwp.check_state_dict({**state, "out.weight": torch.zeros(2, 5)}, exclude="fc.*")] == ["out.weight"]


def test_each_row_says_how_its_weight_was_read():
    with pytest.warns(nwp.CheckpointWarning, match=r"\(assumed\) layouts are guessed for conv.weight"):
        report = nwp.check_state_dict({"conv.weight": torch.zeros(4, 2, 3), "fc.weight": torch.zeros(5, 3)})
    assert [(row.name, row.assumed, row.layout) for row in report] == [("conv.weight", True, Layout()), ("fc.weight", False, Layout())]
    assert [(row["layout"], row["groups"]) for row in report.to_dict()["rows"]] == [("assumed", 1), ("exact", 1)]
    assert "conv.weight (assumed)" in str(report) and "fc.weight (assumed)" not in str(report)
    grouped = nn.Conv1d(4, 4, 3, groups=2)
    row = nwp.check_state_dict(grouped.state_dict(), model=grouped)[0]
    assert not row.assumed and row.layout == Layout(groups=2)


def test_the_command_line_writes_what_project_state_dict_returns(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 10), nn.LSTM(10, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 2)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    assert main(["project", str(tmp_path / "model.pt"), "-o", str(tmp_path / "out.pt"), "--chip", "h1v2"]) == 0
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    expected, _ = nwp.project_state_dict(model.state_dict(), nwp.H1V2)
    assert list(written) == list(expected) and all(same_bits(written[k], expected[k]) for k in expected)
    capsys.readouterr()
    assert main(["check", str(tmp_path / "model.pt"), "--json", "--chip", "h1v2"]) == 1
    rows = json.loads(capsys.readouterr().out)["rows"]
    report = nwp.check_state_dict(model.state_dict(), nwp.H1V2)
    assert [r["name"] for r in rows] == [row.name for row in report]
    assert [r["mixed_block_columns"] for r in rows] == [row.mixed_block_columns for row in report]


def test_an_rnn_weight_without_its_weight_hh_is_named():
    with pytest.raises(nwp.CheckpointError, match=r"cannot tell the gates of rnn.weight_ih_l0: rnn.weight_hh_l0 is not beside it"):
        nwp.check_state_dict({"rnn.weight_ih_l0": torch.zeros(8, 3)})
    with pytest.raises(nwp.CheckpointError, match=r"weight_hh_l0 of shape \(10, 4\) fits no RNN, GRU or LSTM"):
        nwp.check_state_dict({"rnn.weight_ih_l0": torch.zeros(10, 3), "rnn.weight_hh_l0": torch.zeros(10, 4)})


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight


def test_a_tied_parameter_held_with_two_values_is_refused():
    state = {k: v.clone() for k, v in Tied().state_dict().items()}
    state["a.weight"], state["b.weight"] = torch.full((8, 8), 0.1), torch.full((8, 8), 5.0)
    for call in (nwp.check_state_dict, nwp.project_state_dict):
        with pytest.raises(
            nwp.CheckpointError, match="a.weight and b.weight are one parameter of the model, but the checkpoint holds different values"
        ):
            call(state, nwp.H1V2, model=Tied())
    state["b.weight"] = state["a.weight"]  # one value: read once, written under both keys
    new, changes = nwp.project_state_dict(state, nwp.H1V2, model=Tied())
    assert [c["name"] for c in changes] == ["a.weight"] and new["a.weight"] is new["b.weight"]


def test_a_weight_held_twice_or_described_unreadably_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 5))
    nwp.register(model)
    state = model.state_dict()
    with pytest.raises(nwp.CheckpointError, match=r"holds 1.weight twice, as 1.weight and 1.parametrizations.weight.original"):
        nwp.check_state_dict({**state, "1.weight": torch.zeros(5, 5)})
    damaged = {**state, "1.parametrizations.weight.0._extra_state": torch.zeros(3, dtype=torch.int64)}
    with pytest.raises(nwp.CheckpointError, match=r"the description of 1.weight .* cannot be read"):
        nwp.project_state_dict(damaged)
    lost = {k: v for k, v in state.items() if k != "1.parametrizations.weight.0._extra_state"}
    with pytest.warns(UserWarning, match=r"not tracked by the registration .*: 1.weight"):
        assert [row.name for row in nwp.check_state_dict(lost)] == ["0.weight"]


def test_a_model_that_does_not_fit_is_named_on_one_line():
    def net(*sizes):
        return nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])])

    state = net(4, 5, 3).state_dict()
    cases = [
        (state, net(4, 5, 3, 3), "missing 2.weight, 2.bias"),
        ({f"net.{k}": v for k, v in state.items()}, net(4, 5, 3), "missing 0.weight.*unexpected net.0.weight"),
        (state, net(4, 5, 4), r"shape of 1.weight \(3, 5\) in the file, \(4, 5\) in the model"),
    ]
    for bad, model, expected in cases:
        with pytest.raises(nwp.CheckpointError, match=expected) as refused:
            nwp.check_state_dict(bad, model=model)
        assert "\n" not in str(refused.value) and "does not fit the model" in str(refused.value)
    with pytest.raises(nwp.CheckpointError, match="0.weight holds a str, not a tensor"):
        nwp.check_state_dict({**state, "0.weight": "x"}, model=net(4, 5, 3))
    with pytest.raises(nwp.CheckpointError, match="model: .*no trackable weight"):
        nwp.check_state_dict(state, model=nn.Tanh())


def test_arguments_of_the_wrong_kind_are_named():
    state = {"fc.weight": torch.zeros(5, 3)}
    for exclude in (3, None, b"fc.*", ["fc.*", 1]):
        with pytest.raises(TypeError, match="exclude takes a glob pattern"):
            nwp.check_state_dict(state, exclude=exclude)
    with pytest.raises(TypeError, match="assume_plain must be True or False"):
        nwp.check_state_dict(state, assume_plain="no")
    with pytest.raises(TypeError, match=r"keys are names \(str\), got 1 \(int\)"):
        nwp.check_state_dict({1: torch.zeros(5, 3), **state})


def test_read_only_mappings_are_read_and_left_alone():
    import types

    state = {"fc.weight": torch.full((5, 3), 2.0)}
    new, _ = nwp.project_state_dict(types.MappingProxyType(state))
    assert torch.equal(state["fc.weight"], torch.full((5, 3), 2.0)) and new["fc.weight"].max() == torch.tensor(0.9)


def test_no_trackable_weight_says_why():
    with pytest.raises(nwp.CheckpointError, match="excluded as embeddings.*assume_plain"):
        nwp.check_state_dict({"embed.weight": torch.zeros(7, 3)})
    with pytest.raises(nwp.CheckpointError, match=r"it holds state_dict \(a training checkpoint\? pass its state_dict\)"):
        nwp.check_state_dict({"state_dict": {"fc.weight": torch.zeros(5, 3)}, "step": torch.tensor(3)})


def test_an_expanded_weight_is_refused_before_any_computation_with_or_without_the_model(monkeypatch):
    """The issue's: with model=, the file's description (hardness 0.5) made plain_state_dict
    harden the expanded weight before it was refused."""
    model = nn.Sequential(nn.Linear(400, 400))
    nwp.register(model).harden(0.5)
    state = dict(model.state_dict())
    state["0.parametrizations.weight.original"] = torch.full((1, 1), 2.0).expand(400, 400)
    from nwave_param import functional

    def computed(*_, **__):
        raise AssertionError("computed on the expanded weight")

    monkeypatch.setattr(functional, "project", computed)
    for options in ({}, {"model": model}, {"model": nn.Sequential(nn.Linear(400, 400))}):
        for call in (nwp.check_state_dict, nwp.project_state_dict):
            with pytest.raises(nwp.CheckpointError, match=r"^0.weight is an expanded tensor of shape \(400, 400\)") as refused:
                call(state, **options)
            assert "\n" not in str(refused.value)


def test_max_bytes_bounds_what_computing_with_the_tensors_materializes():
    huge = {"fc.weight": torch.full((1, 1), 2.0).expand(40000, 40000), "fc.bias": torch.zeros(40000)}  # the issue's: 6 GiB read
    said = (r"^state_dict: computing with its tensors takes 6.0 GiB \(fc.weight of shape \(40000, 40000\): 6.0 GiB, stored in 4 bytes\), "
            r"more than max_bytes 1.0 GiB; pass a larger max_bytes \(e.g. max_bytes=16 \* 2\*\*30\)")

    class Uncopyable(nn.Module):
        def __deepcopy__(self, memo):
            raise AssertionError("the model was read before the bound was checked")

    for call in (nwp.check_state_dict, nwp.project_state_dict):
        for options in ({}, {"model": Uncopyable()}):
            with pytest.raises(nwp.CheckpointError, match=said):
                call(huge, max_bytes=2**30, **options)
    state = {"fc.weight": torch.full((5, 4), 2.0)}
    with pytest.raises(nwp.CheckpointError, match="takes 80 bytes"):
        nwp.project_state_dict(state, max_bytes=79)
    assert nwp.project_state_dict(state, max_bytes=80)[1][0]["changed"] == 20  # the bound is inclusive
    assert nwp.check_state_dict(state, max_bytes=None).totals["numel"] == 20  # None: no bound
    for bad, error in (("1G", TypeError), (True, TypeError), (1.5e9, TypeError), (0, ValueError), (-1, ValueError)):
        with pytest.raises(error, match="max_bytes must be"):
            nwp.check_state_dict(state, max_bytes=bad)
