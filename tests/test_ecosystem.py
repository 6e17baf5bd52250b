"""nwave_param inside the tools users train with: spiking libraries, mixed precision, torch.compile."""

import copy

import pytest
import torch
from installs import not_installed
from layers import scaled
from torch import nn

import nwave_param as nwp


def train_penalty_only(model, reg, steps=15, lr=50.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    start = reg.penalty_terms()
    for _ in range(steps):
        optimizer.zero_grad()
        reg.penalty().backward()
        optimizer.step()
    return start, reg.penalty_terms()


# --- snnTorch --------------------------------------------------------------------------------


def test_snntorch_rsynaptic_and_slstm_are_tracked_and_trained():
    snn = pytest.importorskip("snntorch", reason=not_installed("snntorch"))
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "syn": snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=12),
            "lstm": snn.SLSTM(input_size=4, hidden_size=7),
        }
    )
    reg = nwp.register(scaled(model, 8.0))
    assert reg.names == ["syn.recurrent.weight", "lstm.lstm_cell.weight_ih", "lstm.lstm_cell.weight_hh"]
    assert [c.layout.gates for c in (model.lstm.lstm_cell.parametrizations.weight_ih[0],)] == [4]
    start, end = train_penalty_only(model, reg)
    assert end.magnitude < start.magnitude and end.topology < start.topology
    spk, syn, mem = model.syn.init_rsynaptic()
    with reg.cached():
        spk, syn, mem = model.syn(torch.rand(3, 12), spk, syn, mem)
        out, *state = model.lstm(torch.rand(3, 4), *model.lstm.init_slstm())
    assert torch.isfinite(mem).all() and torch.isfinite(out).all()


# --- Norse -----------------------------------------------------------------------------------


def test_norse_recurrent_lif_weights_are_tracked_with_identical_outputs():
    norse = pytest.importorskip("norse.torch", reason=not_installed("norse"))
    torch.manual_seed(0)
    plain = norse.LIFRecurrent(5, 7)
    registered = copy.deepcopy(plain)
    reg = nwp.register(registered)
    assert reg.names == ["input_weights", "recurrent_weights"]
    x = torch.rand(6, 3, 5) * 5
    out_plain, _ = plain(x)
    with reg.cached():
        out_registered, _ = registered(x)
    assert torch.equal(out_plain, out_registered)
    start, end = train_penalty_only(scaled(registered, 8.0), reg)
    assert end.magnitude < start.magnitude and end.topology < start.topology
    reg.remove()
    assert list(registered.state_dict()) == list(plain.state_dict())


# --- weights parametrize cannot reach ---------------------------------------------------------


def test_plain_tensor_weight_attribute_warns_with_its_name():
    class Hidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.mix_weight = torch.randn(3, 3)  # a plain attribute: not a Parameter

    with pytest.warns(UserWarning, match="mix_weight"):
        reg = nwp.register(Hidden())
    assert reg.names == ["fc.weight"]


# --- mixed precision -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_penalties_accumulate_in_float32(dtype):
    torch.manual_seed(0)
    reference = scaled(nn.Sequential(nn.Linear(32, 30), nn.Linear(30, 20)), 20.0)
    low = copy.deepcopy(reference).to(dtype)
    exact = copy.deepcopy(low).float()  # the same (rounded) values, in float32
    p_low, p_exact = nwp.register(low).penalty_terms(), nwp.register(exact).penalty_terms()
    for a, b in zip(p_low, p_exact):
        assert a.dtype == torch.float32 and torch.isfinite(a)
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-6)
    report_low, report_exact = nwp.registry_of(low).report(), nwp.registry_of(exact).report()
    for a, b in zip(report_low.rows, report_exact.rows):
        assert (a.out_of_range, a.mixed_block_columns, a.max_abs) == (b.out_of_range, b.mixed_block_columns, b.max_abs)
    nwp.registry_of(low).penalty().backward()
    assert all(p.grad.dtype == dtype for p in nwp.registry_of(low).latent_weights())


def test_bf16_autocast_training_step():
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 4)), 10.0)
    reg = nwp.register(model)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y) + reg.penalty()
    assert reg.penalty().dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(w.grad).all() for w in reg.latent_weights())


# --- torch.compile ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_registered_model_trains_like_eager():
    torch.manual_seed(0)
    eager = scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 4.0)
    compiled_source = copy.deepcopy(eager)
    reg_eager, reg_compiled = nwp.register(eager), nwp.register(compiled_source)  # register, then compile
    compiled = torch.compile(compiled_source)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled_source)]
    for _ in range(3):
        for model, reg, optimizer in ((eager, reg_eager, optimizers[0]), (compiled, reg_compiled, optimizers[1])):
            optimizer.zero_grad()
            (nn.functional.cross_entropy(model(x), y) + reg.penalty()).backward()
            optimizer.step()
    for a, b in zip(reg_eager.latent_weights(), reg_compiled.latent_weights()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- DistributedDataParallel -----------------------------------------------------------------


def _ddp_model():
    torch.manual_seed(0)
    return scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 3.0)


def _batches(world):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(4, 4 * world, 6, generator=generator), torch.randint(0, 3, (4, 4 * world), generator=generator)


def _train(model, reg, xs, ys):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    for x, y in zip(xs, ys):
        optimizer.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + reg.penalty()).backward()
        optimizer.step()


def _ddp_worker(rank, world, port, out):
    import datetime
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a lost peer fails the test within a minute instead of hanging for gloo's default 30
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = _ddp_model()
        nwp.register(model)  # register, then wrap
        ddp = DistributedDataParallel(model)
        reg = nwp.registry_of(ddp.module).harden(0.7)  # every rank hardens alike
        xs, ys = _batches(world)
        _train(ddp, reg, xs[:, rank::world], ys[:, rank::world])
        torch.save([w.detach() for w in reg.latent_weights()], f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # skip the interpreter's teardown: with torch 2.13, freeing DDP's reducer there can deadlock
    # (~ProcessGroupGloo joins a work thread that waits for the GIL the freeing thread holds)
    os._exit(0)


@pytest.mark.slow
def test_ddp_two_hardened_processes_match_single_process_training(tmp_path):
    import socket
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "weights"
    workers = mp.spawn(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not workers.join(timeout=5):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two DDP workers did not finish within 5 minutes")
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    model = _ddp_model()
    reg = nwp.register(model).harden(0.7)
    xs, ys = _batches(2)
    _train(model, reg, xs, ys)
    for a, b, single in zip(rank0, rank1, reg.latent_weights()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, single.detach(), rtol=1e-5, atol=1e-6)


# --- PyTorch Lightning (the README recipe) ---------------------------------------------------


def test_lightning_recipe_trains_and_logs_the_report():
    L = pytest.importorskip("lightning", reason=not_installed("lightning"))

    class Module(L.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.reg = nwp.register(net)
            self.logged = []

        def training_step(self, batch, _):
            x, y = batch
            with self.reg.cached():
                loss = nn.functional.cross_entropy(self.net(x), y)
            return loss + 50 * self.reg.penalty()

        def on_train_epoch_end(self):
            totals = self.reg.report().totals
            self.logged.append(totals["mixed_block_columns"])
            self.log_dict({"mixed_block_columns": float(totals["mixed_block_columns"]), "out_of_range": float(totals["out_of_range"])})

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    module = Module(scaled(nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)), 5.0))
    trainer = L.Trainer(
        max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=16))
    assert len(module.logged) == 8 and module.logged[-1] < module.logged[0]
    assert "mixed_block_columns" in trainer.callback_metrics
