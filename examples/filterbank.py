"""A new user's spiking network on a 16-channel filterbank, trained with the rule and without.

Run: python examples/filterbank.py [--seed N] [--epochs E] [--train N] [--test N]

The task, synthetic and test-sized: 0.4 s of 8 kHz audio, a tone, a rising chirp or a falling one,
in a low or a high band (six classes), with a weak distractor tone and noise, read through 16
log-spaced band energies every 20 ms: the chip's 16 front-end channels, 21 time steps.  The
network, built from the chip's blocks: ``nwp.FrontEnd`` (one gain per channel), 16 front-end
neurons, a recurrent population of 100 (H1v2's largest core) and 5 spiking outputs per class,
read by spike counts.  It trains twice from one initialization, with one learning-rate decay:
without constraints, and with ``nwp.Schedule``'s rule; the second is then put on the chip
(``reg.project_()``), which changes none of its outputs.
"""

from __future__ import annotations

import argparse
import copy
import math

import torch
from torch import nn

import nwave_param as nwp
from nwave_param.core.schedule import settling

RATE, SECONDS, HOP, CHANNELS, CLASSES, PER_CLASS = 8000, 0.4, 160, 16, 6, 5
THRESHOLD = 1.0  # the chip's one threshold, as the demo's on H1v2: a synapse at the limit moves a membrane 1.66 thresholds


def sounds(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` sounds as band energies ``(time, count, 16)``, standardized later, and their classes."""
    t = torch.arange(int(RATE * SECONDS)) / RATE
    label = torch.randint(0, CLASSES, (count,), generator=generator)
    kind, high = label // 2, label % 2  # tone, rising, falling; low or high band
    start = torch.where(high == 1, 1000.0, 250.0) * torch.exp(torch.rand(count, generator=generator) * math.log(3.0))
    octaves = 0.5 + torch.rand(count, generator=generator)  # the sweep of a chirp, in octaves
    rate = torch.where(kind == 0, 1e-6, torch.where(kind == 1, 1.0, -1.0) * octaves * math.log(2.0))  # log-frequency change over the sound
    phase = 2 * math.pi * start[:, None] * SECONDS * torch.expm1(rate[:, None] * t / SECONDS) / rate[:, None]
    loudness = 0.3 + torch.rand(count, 1, generator=generator)
    audio = loudness * torch.sin(phase + 2 * math.pi * torch.rand(count, 1, generator=generator))
    distractor = 150 * torch.exp(torch.rand(count, 1, generator=generator) * math.log(24.0))
    audio = audio + 0.5 * loudness * torch.rand(count, 1, generator=generator) * torch.sin(2 * math.pi * distractor * t)
    audio = audio + 0.35 * torch.randn(audio.shape, generator=generator)
    power = torch.stft(audio, 256, HOP, window=torch.hann_window(256), return_complex=True).abs() ** 2  # (count, 129, frames)
    frequencies = torch.linspace(0, RATE / 2, power.shape[1])
    edges = torch.exp(torch.linspace(math.log(150), math.log(3600), CHANNELS + 2))
    bank = torch.stack([
        ((frequencies - a) / (c - a)).clamp(0, 1) * ((b - frequencies) / (b - c)).clamp(0, 1)
        for a, c, b in zip(edges, edges[1:], edges[2:])
    ])
    return torch.log(torch.einsum("cf,nft->tnc", bank, power) + 1e-3), label


def task(train: int, test: int) -> tuple[torch.Tensor, ...]:
    """The data, the same whatever the seed of training: ``x_train, y_train, x_test, y_test``."""
    generator = torch.Generator().manual_seed(1234)
    (x_train, y_train), (x_test, y_test) = sounds(train, generator), sounds(test, generator)
    mean, spread = x_train.mean((0, 1)), x_train.std((0, 1))
    return (x_train - mean) / spread, y_train, (x_test - mean) / spread, y_test


class SpikingNet(nn.Module):
    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.gain = nwp.FrontEnd(CHANNELS)
        self.front = nwp.ChipLeaky(0.9, learn_beta=True, threshold=THRESHOLD)
        self.encode = nn.Linear(CHANNELS, hidden)
        self.hidden = nwp.ChipRLeaky(0.9, linear_features=hidden, learn_beta=True, threshold=THRESHOLD)
        self.readout = nn.Linear(hidden, CLASSES * PER_CLASS)
        self.out = nwp.ChipLeaky(0.9, learn_beta=True, threshold=THRESHOLD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (time, batch, 16)
        front, out = self.front.init_leaky(), self.out.init_leaky()
        spikes, hidden = self.hidden.init_rleaky()
        counts = 0
        for x_t in x:
            front_spikes, front = self.front(self.gain(x_t), front)
            spikes, hidden = self.hidden(self.encode(front_spikes), spikes, hidden)
            out_spikes, out = self.out(self.readout(spikes), out)
            counts = counts + out_spikes
        return counts.view(-1, CLASSES, PER_CLASS).sum(-1)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, data: tuple, epochs: int, seed: int, on_chip: bool, spec: nwp.ChipSpec = nwp.H1V2) -> nwp.Registry | None:
    """Adam with the rule's learning-rate decay; on the chip, the whole rule (``nwp.Schedule``)."""
    x, y = data[0], data[1]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = -(-x.shape[1] // 64)
    reg = nwp.register(model, spec) if on_chip else None
    if reg is not None:
        schedule = nwp.Schedule(reg, epochs * batches, optimizer)
    else:  # the same decay, without constraints: the comparison measures the chip alone
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: settling(step, epochs * batches))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(x.shape[1], generator=generator).split(64):
            if reg is not None and schedule.steps == schedule.regroup_step:  # once, before the constraints start
                nwp.regroup_(model, x[:, batch], optimizer)
            if reg is not None:
                with reg.cached():
                    loss = nn.functional.cross_entropy(model(x[:, batch]), y[batch]) + schedule.penalty()
            else:
                loss = nn.functional.cross_entropy(model(x[:, batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            (schedule if reg is not None else decay).step()
    return reg


def compare(seed: int = 0, epochs: int = 40, train_size: int = 1200, test_size: int = 600) -> tuple[float, float, float]:
    """Test accuracy of the net trained without constraints, and of the one trained with the rule,
    on the chip and as trained."""
    data = task(train_size, test_size)
    torch.manual_seed(seed)
    initial = SpikingNet()
    plain, chip = copy.deepcopy(initial), copy.deepcopy(initial)
    train(plain, data, epochs, seed, on_chip=False)
    reg = train(chip, data, epochs, seed, on_chip=True)
    as_trained = accuracy(chip, data[2], data[3])
    reg.project_()
    assert reg.is_mappable() and nwp.place(chip, data[2][:, :1], reg.spec).fits
    return accuracy(plain, data[2], data[3]), accuracy(chip, data[2], data[3]), as_trained


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train", type=int, default=1200)
    parser.add_argument("--test", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast, and never spins
    unconstrained, on_chip, as_trained = compare(args.seed, args.epochs, args.train, args.test)
    print(f"test accuracy: unconstrained {100 * unconstrained:.1f}%, on the chip {100 * on_chip:.1f}% (as trained {100 * as_trained:.1f}%)")
