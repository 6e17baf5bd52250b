"""A registered model's state_dict: only tensors, so users' tools work; a checkpoint computes what
its model computed; the plain export computes what the registered model computes."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from installs import not_installed
from layers import KINDS, assert_same_snapshot, fill, make_model, model_cfgs, outputs, same_bits, scaled, snapshot, values_cfgs
from torch import nn
from torch.nn.utils import parametrizations
from torch.optim.swa_utils import AveragedModel

import nwave_param as nwp
from nwave_param import description
from nwave_param.layout import Layout


def net():
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(4, 7), "lstm": nn.LSTM(7, 6), "head": nn.Linear(6, 3)})
    return scaled(model, 3)


def run(model, x):
    out, _ = model["lstm"](torch.tanh(model["fc"](x)))
    return model["head"](out)


X = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(1))
SPEC = nwp.ChipSpec(bits=5, mismatch=0.02)


def trained(hardness=0.5):
    """A registered net after a training step, hardened, in eval mode (no mismatch noise)."""
    model = net()
    reg = nwp.register(model, SPEC).harden(hardness)
    with reg.cached():
        run(model, X).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return model.eval(), reg


def fresh():
    model = net()
    torch.manual_seed(7)
    for p in model.parameters():  # other values, so that a load that does nothing shows
        nn.init.normal_(p)
    return model.eval(), nwp.register(model, SPEC)


def assert_computes_alike(model, other):
    with torch.no_grad():
        assert same_bits(run(model, X), run(other, X))


# --- descriptions of other versions (the format itself: test_description.py) ------------------


def version_0_3(layout, spec, hardness):
    """A description as nwave_param 0.3 wrote it: format ``nwp2``, its 16-bit words stored as they are."""
    import struct
    import zlib

    record = struct.pack(
        "<4sQQ?dQBddQQ", b"nwp2", layout.gates, layout.groups, layout.transposed, spec.limit, spec.group_size,
        spec.bits or 0, spec.mismatch, hardness, spec.inputs, len(spec.cores),
    ) + b"".join(struct.pack("<Q", n) for n in spec.cores)
    record += struct.pack("<I", zlib.crc32(record))
    return torch.tensor(struct.unpack(f"<{len(record) // 2}H", record), dtype=torch.int64)


def test_a_version_0_3_description_still_reads_and_loads():
    source, _ = trained()
    state = source.state_dict()
    for key in [k for k in state if k.endswith("_extra_state")]:
        saved = description.decode(state[key])
        state[key] = version_0_3(saved.layout, saved.spec, saved.hardness)
        assert description.decode(state[key]) == (saved.layout, dataclasses.replace(saved.spec, reset=None), saved.hardness)
    target, reg = fresh()
    with pytest.warns(UserWarning, match="hardness"):
        target.load_state_dict(state)
    assert reg.hardness == 0.5
    assert_computes_alike(source, target)


def test_a_description_of_a_newer_format_is_refused_as_written_by_a_newer_nwave_param(tmp_path):
    source, _ = trained()
    state = source.state_dict()
    key = "head.parametrizations.weight.0._extra_state"
    words = (state[key] - 1) // 2
    words[1] = (words[1] & 0xFF) | (ord("9") << 8)  # the format number, the magic's fourth byte: 9
    state[key] = words * 2 + 1
    with pytest.raises(description.NewerDescriptionError):
        description.decode(state[key])
    assert not description.damaged(state[key])
    target, _ = fresh()
    before = snapshot(target)
    with pytest.raises(
        ValueError,
        match=r"head\.weight: a description written by a newer nwave_param \(format 9; this one reads up to 3\): upgrade nwave_param",
    ):
        target.load_state_dict(state)
    assert_same_snapshot(before, snapshot(target))
    with pytest.raises(nwp.CheckpointError, match=r"head\.weight .* holds a description written by a newer nwave_param"):
        nwp.check_state_dict(state)


def test_a_version_0_2_description_still_reads_and_loads_without_touching_the_hardness():
    legacy = {"format": "nwave_param/1", "layout": {"gates": 4, "groups": 1, "transposed": False},
              "spec": {"limit": 0.9, "group_size": 5, "bits": None, "mismatch": 0.0}}
    assert description.decode(legacy) == (Layout(gates=4), nwp.ChipSpec(), None)
    source, _ = trained()
    state = {k: legacy if k == "lstm.parametrizations.weight_ih_l0.0._extra_state" else v for k, v in source.state_dict().items()}
    for key in [k for k in state if k.endswith("_extra_state") and "weight_ih" not in k]:
        state[key] = {**legacy, "layout": {"gates": 4 if "lstm" in key else 1, "groups": 1, "transposed": False}}
    target = net()
    reg = nwp.register(target, nwp.ChipSpec()).harden(0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        target.load_state_dict(state)
    assert reg.hardness == 0.25  # a 0.2 checkpoint did not save one


# --- the tools users pair with ours ------------------------------------------------------------


def saved_and_loaded(state, tmp_path):
    torch.save(state, tmp_path / "model.pt")
    return torch.load(tmp_path / "model.pt", weights_only=True)


def test_a_registered_state_dict_holds_only_tensors(tmp_path):
    model, _ = trained()
    state = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert saved_and_loaded(state, tmp_path).keys() == state.keys()


def test_torch_load_with_weights_only_then_assign_restores_the_model(tmp_path):
    model, _ = trained()
    target, reg = fresh()
    with pytest.warns(UserWarning, match="hardness 0.5"):
        target.load_state_dict(saved_and_loaded(model.state_dict(), tmp_path), assign=True)
    assert reg.hardness == 0.5
    assert isinstance(target["fc"].parametrizations.weight.original, nn.Parameter)
    assert_computes_alike(model, target)


def test_safetensors_files_and_models_round_trip_into_a_registered_model(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch", reason="safetensors not installed (pip install safetensors)")
    model, _ = trained()
    safetensors.save_file(model.state_dict(), tmp_path / "a.safetensors")
    target, reg = fresh()
    with pytest.warns(UserWarning, match="hardness"):
        target.load_state_dict(safetensors.load_file(tmp_path / "a.safetensors"))
    assert reg.hardness == 0.5
    assert_computes_alike(model, target)

    safetensors.save_model(model, tmp_path / "b.safetensors")
    target, reg = fresh()
    with pytest.warns(UserWarning, match="hardness"):
        missing, unexpected = safetensors.load_model(target, tmp_path / "b.safetensors")
    assert not missing and not unexpected and reg.hardness == 0.5
    assert_computes_alike(model, target)


def test_the_usual_ema_idioms_work_on_a_registered_model():
    model, reg = trained()
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}  # a best-so-far / EMA snapshot
    ema, _ = fresh()
    with pytest.warns(UserWarning, match="hardness"):
        ema.load_state_dict(snapshot)
    for ema_value, value in zip(ema.state_dict().values(), model.state_dict().values()):
        ema_value.copy_(value)  # the zip-and-copy_ EMA update
    assert_computes_alike(model, ema)
    decay = 0.9
    with torch.no_grad():
        for ema_value, value in zip(ema.parameters(), model.parameters()):
            ema_value.mul_(decay).add_(value, alpha=1 - decay)
    assert nwp.registry_of(ema).hardness == reg.hardness


def test_averaged_model_of_a_hardened_model_averages_and_saves(tmp_path):
    model, reg = trained()
    average = AveragedModel(model)
    average.update_parameters(model)
    assert nwp.registry_of(average.module).hardness == reg.hardness
    target, _ = fresh()
    with pytest.warns(UserWarning, match="hardness"):
        target.load_state_dict(saved_and_loaded(average.module.state_dict(), tmp_path))
    assert_computes_alike(model, target)


# The update rules of timm's ModelEmaV2 and ModelEmaV3 (timm 1.0.31, timm/utils/model_ema.py),
# written out: timm imports torchvision, which here would replace the CPU build of torch.


def timm_ema_v2_update(ema_module, model, decay):
    """ModelEmaV2.update: every state_dict entry, ``ema_v.copy_(decay * e + (1 - decay) * m)``."""
    with torch.no_grad():
        for ema_v, model_v in zip(ema_module.state_dict().values(), model.state_dict().values()):
            ema_v.copy_(decay * ema_v + (1.0 - decay) * model_v)


def timm_ema_v3_update(ema_module, model, decay, exclude_buffers=False):
    """ModelEmaV3.apply_update_ (foreach): floating entries lerped, the others copied; with
    ``exclude_buffers``, apply_update_no_buffers_: parameters lerped, buffers copied."""
    with torch.no_grad():
        if exclude_buffers:
            torch._foreach_lerp_(list(ema_module.parameters()), list(model.parameters()), weight=1.0 - decay)
            for ema_b, model_b in zip(ema_module.buffers(), model.buffers()):
                ema_b.copy_(model_b)
            return
        ema_values, model_values = [], []
        for ema_v, model_v in zip(ema_module.state_dict().values(), model.state_dict().values()):
            if ema_v.is_floating_point():
                ema_values.append(ema_v)
                model_values.append(model_v)
            else:
                ema_v.copy_(model_v)
        torch._foreach_lerp_(ema_values, model_values, weight=1.0 - decay)


def normed_net():
    """A registered net with a BatchNorm, whose ``num_batches_tracked`` is an integer entry."""
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(4, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)), 3)
    return model, nwp.register(model, SPEC)


def train_step(model, reg):
    model.train()
    with reg.cached():
        model(torch.randn(8, 4)).square().mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    model.zero_grad()


@pytest.mark.parametrize(
    "rule", ["timm ModelEmaV2", "timm ModelEmaV3", "timm ModelEmaV3 without buffers", "AveragedModel(use_buffers=True)"]
)
def test_an_ema_copy_of_a_registered_model_trains_loads_and_keeps_its_descriptions(rule, tmp_path):
    import copy

    model, reg = normed_net()
    average = AveragedModel(model, use_buffers=True, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema = average.module if rule.startswith("AveragedModel") else copy.deepcopy(model).eval()
    for step in range(5):
        reg.harden(step / 4)
        nwp.registry_of(ema).harden(reg.hardness)  # the one line that keeps a copy at its source's hardness
        train_step(model, reg)
        if rule == "timm ModelEmaV2":
            timm_ema_v2_update(ema, model, 0.9)
        elif rule.startswith("timm ModelEmaV3"):
            timm_ema_v3_update(ema, model, 0.9, exclude_buffers="without" in rule)
        else:
            average.update_parameters(model)
    saved = saved_and_loaded(ema.state_dict(), tmp_path)
    for key, value in saved.items():
        if key.endswith("_extra_state"):
            assert description.decode(value) == (Layout(), SPEC, 1.0), key
    target, target_reg = normed_net()
    with pytest.warns(UserWarning, match="hardness"):
        target.load_state_dict(saved)
    assert target_reg.hardness == 1.0 and nwp.registry_of(ema).hardness == 1.0
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert same_bits(target.eval()(x), ema.eval()(x))


def test_an_ema_copy_made_before_harden_keeps_its_own_hardness_until_told():
    import copy

    model, reg = normed_net()
    ema = copy.deepcopy(model)  # copies are independent: hardening one never reaches the other
    reg.harden(1.0)
    assert nwp.registry_of(ema).hardness == 0.0
    nwp.registry_of(ema).harden(reg.hardness)
    x = torch.randn(6, 4)
    with torch.no_grad():
        assert same_bits(ema.eval()(x), model.eval()(x))


def test_the_in_place_ema_idiom_skips_the_entries_that_are_not_floating_point():
    """``e.mul_(d).add_(v, alpha=1 - d)`` fails in torch on every integer entry, BatchNorm's counter
    included; the usual fix (shown in docs/integrations.md) copies those instead."""
    model, reg = normed_net()
    train_step(model, reg)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_step(model, reg)
    with torch.no_grad(), pytest.raises(RuntimeError, match="can't be cast"):
        for e, v in zip(ema.values(), model.state_dict().values()):
            e.mul_(0.9).add_(v, alpha=0.1)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for e, v in zip(ema.values(), model.state_dict().values()):
            if e.is_floating_point():
                e.mul_(0.9).add_(v, alpha=0.1)
            else:
                e.copy_(v)
    target, _ = normed_net()
    target.load_state_dict(ema)
    assert all(description.decode(v) is not None for k, v in target.state_dict().items() if k.endswith("_extra_state"))


def test_lightning_checkpoint_restores_the_hardness_and_what_the_model_computes(tmp_path):
    L = pytest.importorskip("lightning", reason=not_installed("lightning"))

    class Module(L.LightningModule):
        def __init__(self, hardness=0.0):
            super().__init__()
            self.net = scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 5.0)
            self.reg = nwp.register(self.net, SPEC)

        def on_train_epoch_start(self):
            self.reg.harden(min(1.0, self.current_epoch / 2))

        def training_step(self, batch, _):
            x, y = batch
            with self.reg.cached():
                loss = nn.functional.cross_entropy(self.net(x), y)
            return loss + self.reg.penalty()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    module = Module()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(max_epochs=4, logger=False, callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert module.reg.hardness == 1.0
    with pytest.warns(UserWarning, match="hardness 1.0"):
        loaded = Module.load_from_checkpoint(checkpoint.last_model_path, weights_only=True)
    assert loaded.reg.hardness == 1.0
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert same_bits(module.net.eval()(x), loaded.net.eval()(x))


# --- a checkpoint computes what its model computed ---------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(data=st.data(), vcfg=values_cfgs, h=st.sampled_from([0.0, 0.5, 1.0]), grid=st.sampled_from([None, 4]))
def test_a_checkpoint_loaded_into_a_fresh_registration_computes_bit_for_bit_alike(kind, data, vcfg, h, grid):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    spec = nwp.ChipSpec(limit=0.9, bits=grid)
    model = make_model(cfg)
    fill(model, vcfg, 0.9)
    nwp.register(model, spec).harden(h)
    target = make_model(cfg)
    reg = nwp.register(target, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target.load_state_dict(model.state_dict())
    assert reg.hardness == h and len(caught) == (h != 0)
    assert all(same_bits(a, b) for a, b in zip(outputs(model), outputs(target)))


# --- the plain export --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6)
@given(data=st.data(), vcfg=values_cfgs, h=st.sampled_from([0.0, 0.5, 1.0]), grid=st.sampled_from([None, 4]))
def test_a_plain_model_loading_the_plain_export_computes_bit_for_bit_alike(kind, data, vcfg, h, grid):
    cfg = data.draw(model_cfgs(kind), label="cfg")
    model = make_model(cfg)
    fill(model, vcfg, 0.9)
    nwp.register(model, nwp.ChipSpec(limit=0.9, bits=grid, mismatch=0.05)).harden(h)
    model.eval()  # no mismatch noise: the plain export is what the model computes in eval mode
    plain = make_model(cfg)
    plain.load_state_dict(nwp.plain_state_dict(model), strict=True)
    assert all(same_bits(a, b) for a, b in zip(outputs(model), outputs(plain)))
    from_file = nwp.plain_state_dict(model.state_dict())  # the same from the checkpoint alone
    assert list(from_file) == list(nwp.plain_state_dict(model))
    assert all(same_bits(a, b) for a, b in zip(from_file.values(), nwp.plain_state_dict(model).values()))


def test_the_plain_export_of_a_tied_weight_stays_one_tensor():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    scaled(model, 4)
    nwp.register(model).harden(1.0)
    plain = nwp.plain_state_dict(model)
    assert plain["0.weight"] is plain["2.weight"]
    assert torch.equal(plain["0.weight"], model[0].weight) and torch.equal(plain["2.weight"], model[2].weight)


def test_the_plain_export_refuses_a_hardened_weight_its_other_parametrizations_cannot_hold():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 10)), 3)
    parametrizations.weight_norm(model[1])
    reg = nwp.register(model).harden(0.5)
    state = model.state_dict()
    with pytest.raises(ValueError, match=r"1\.weight.*project_"):
        nwp.plain_state_dict(model)
    with pytest.raises(ValueError, match=r"1\.weight.*project_"):
        nwp.plain_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(state.values(), model.state_dict().values()))  # nothing changed
    reg.project_()
    plain = nwp.plain_state_dict(model)  # projected: weight_norm's own keys hold what the model computes
    target = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 10))
    parametrizations.weight_norm(target[1])
    target.load_state_dict(plain, strict=True)
    x = torch.randn(3, 4)
    assert torch.equal(target(x), model(x))
