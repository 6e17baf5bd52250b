"""``nwave-param demo``: a spiking network built for the chip, trained three ways, then put on it.

The network is one the chip can place (``nwp.place`` checks it, and the demo prints where each
population sits) and computes with the chip's neurons as the vendor documents them: membranes
never below zero (clamped after each update), reset by subtraction, one threshold for all.  It
reads scikit-learn's handwritten digits, each 8x8 image as 8 time steps of its 8 pixel rows:

* **front end**: 16 neurons, one per channel of the chip's front end, each fed one-to-one (a
  diagonal synapse, which nwave_param trains and projects like any weight): the 8 pixels of a row
  and their complements (ON and OFF channels, as event sensors encode);
* **hidden**: a recurrent population (snnTorch ``RLeaky``, all-to-all, learnable decay) as large as
  the chip's largest core, where recurrent connections must stay;
* **output**: ``READOUT_NEURONS`` (5) spiking neurons per class, read by spike counts: each class is
  one block of the chip, so the sign each hidden neuron sends to a block is the sign it sends to
  one class.

Three runs start from one initialization:

* **baseline**: the task loss alone;
* **constrained**: ``task + scale * reg.penalty()``, ``scale`` rising linearly from 0 to
  ``PENALTY_SCALE`` over the first half of the epochs and held there;
* **hardened**: the constrained run's penalties, and the hardness rising linearly from 0 to 1 over
  ``HARDEN`` (10% to 40%) of the training steps, then held at 1: the network computes with exactly
  what the chip holds (the gradient passes straight through to the latent weights), so projecting
  it after training changes nothing.

All three keep the learning rate constant, then decay it linearly to 0 over the last
``1 - SETTLE`` of training, so that the weights settle rather than keep moving (on a grid, across
rounding boundaries).  Each run is then projected onto the chip with ``reg.project_()`` and
evaluated again.  With ``--bits`` or ``--mismatch`` all three are registered under that spec (the
hardened run trains against the grid and the mismatch), and each is also evaluated on ``CHIPS``
chip instances (``reg.on_chip(seed)``): the mean and the worst.

The networks are tiny: one intra-op thread computes them as fast as two, and does not slow to a
crawl when other processes share the CPU (spinning worker threads would), so the demo sets one
for its duration.

Needs the demo extra: ``pip install "nwave-param[demo]"`` (scikit-learn, snnTorch, matplotlib, tqdm).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch import nn

from .guards import INTERRUPTIONS
from .outputs import Outputs
from .placement import Placement, place
from .registry import Registry, register
from .report import Report
from .spec import H1V1, H1V2, ChipSpec

CHIP_SPECS = {"h1v1": H1V1, "h1v2": H1V2}
PENALTY_SCALE = 20.0
HARDEN = (0.1, 0.4)  # where the hardness rises, in training steps
SETTLE = 0.6  # where the learning rate starts its decay to 0
CHIPS = 10
READOUT_NEURONS = 5  # per class: one block of the chip
THRESHOLD = 1.0  # one firing threshold for the whole network
PIXELS, CLASSES = 8, 10
SEED = 0
RUNS = ("baseline", "constrained", "hardened")


def _requirements():
    try:
        import snntorch
        import tqdm
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from snntorch import surrogate
    except ImportError as error:
        raise ImportError(f"the demo needs its extra: pip install 'nwave-param[demo]' ({error})") from None
    return snntorch, surrogate, tqdm.tqdm, load_digits, train_test_split


class OneToOne(nn.Module):
    """The front end's synapses: channel ``i`` feeds neuron ``i`` alone (a diagonal weight; its
    other entries stay zero, as no gradient reaches them)."""

    def __init__(self, channels: int, gain: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels) * gain)
        self.register_buffer("diagonal", torch.eye(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.diagonal)


class SpikingNet(nn.Module):
    """Front end (one neuron per input channel) -> recurrent hidden population (one core) ->
    spiking output, ``READOUT_NEURONS`` per class, read by spike counts."""

    def __init__(self, spec: ChipSpec = H1V2, classes: int = CLASSES) -> None:
        super().__init__()
        snntorch, surrogate, *_ = _requirements()
        hidden = max(spec.cores)
        neuron = dict(
            beta=0.9, learn_beta=True, threshold=THRESHOLD, reset_mechanism=spec.reset or "subtract", spike_grad=surrogate.fast_sigmoid(slope=25)
        )
        self.classes = classes
        self.gain = OneToOne(2 * PIXELS)
        self.front = snntorch.Leaky(**neuron)
        self.encode = nn.Linear(2 * PIXELS, hidden)
        self.lif = snntorch.RLeaky(linear_features=hidden, **neuron)
        self.readout = nn.Linear(hidden, classes * READOUT_NEURONS)
        self.out = snntorch.Leaky(**neuron)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (time, batch, pixels) in [0, 1]
        channels = torch.cat([x, 1 - x], -1)  # ON and OFF: the chip's 16 front-end channels
        front = out = torch.zeros(())
        spikes, hidden = self.lif.reset_mem()
        counts = 0
        for x_t in channels:
            # the chip's membranes never go below zero: clamped after each update
            front_spikes, front = self.front(self.gain(x_t), front)
            front = front.clamp(min=0)
            spikes, hidden = self.lif(self.encode(front_spikes), spikes, hidden)
            hidden = hidden.clamp(min=0)
            out_spikes, out = self.out(self.readout(spikes), out)
            out = out.clamp(min=0)
            counts = counts + out_spikes
        return counts.view(-1, self.classes, READOUT_NEURONS).sum(-1)  # spike counts per class


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test sets: images as (time=8, samples, 8) in [0, 1]; a fixed stratified split."""
    *_, load_digits, train_test_split = _requirements()
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images / 16.0, data.target, test_size=0.3, stratify=data.target, random_state=SEED
    )

    def as_time_major(images):
        return torch.tensor(images, dtype=torch.float32).permute(1, 0, 2).contiguous()

    return as_time_major(x_train), torch.tensor(y_train), as_time_major(x_test), torch.tensor(y_test)


@torch.no_grad()
def accuracy(model: nn.Module, reg: Registry, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with reg.cached():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, reg: Registry, data, epochs: int, run: str) -> None:
    *_, progress, _, _ = _requirements()
    x_train, y_train, *_ = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    steps = epochs * -(-x_train.shape[1] // 64)
    # constant, then linearly to 0: the weights settle (see the module docstring)
    settle = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (steps - step) / ((1 - SETTLE) * steps)))
    start, end = HARDEN
    step = 0
    bar = progress(range(epochs), desc=run, leave=False, disable=None)  # a bar on a terminal only
    model.train()
    for _ in bar:
        for batch in torch.randperm(x_train.shape[1], generator=generator).split(64):
            done = step / steps
            if run == "hardened":
                reg.harden(min(1.0, max(0.0, (done - start) / (end - start))))
            with reg.cached():
                loss = nn.functional.cross_entropy(model(x_train[:, batch]), y_train[batch])
                if run != "baseline":
                    loss = loss + PENALTY_SCALE * min(1.0, 2 * done) * reg.penalty()  # rising over the first half
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            settle.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}")


@dataclass
class Outcome:
    float_accuracy: float  # as trained: computed with the weights the network trained with
    projected_accuracy: float  # after reg.project_(): on the chip
    mappable_before: bool  # the latent weights, before projection
    mappable_after: bool
    out_of_range_fraction: float
    mixed_block_column_fraction: float
    report_before: Report
    report_after: Report
    weights_before: list[torch.Tensor]
    chip_accuracies: list[float]  # on CHIPS chip instances, with a spec that has bits or mismatch

    KEYS = ("float_accuracy", "projected_accuracy", "mappable_before", "mappable_after", "out_of_range_fraction", "mixed_block_column_fraction")

    def to_dict(self) -> dict:
        result = {key: getattr(self, key) for key in self.KEYS}
        if self.chip_accuracies:
            result["chip_accuracy_mean"] = sum(self.chip_accuracies) / len(self.chip_accuracies)
            result["chip_accuracy_worst"] = min(self.chip_accuracies)
        return result


def evaluate(model: nn.Module, reg: Registry, data) -> Outcome:
    *_, x_test, y_test = data
    before = reg.report()
    weights_before = [w.detach().clone() for w in reg.latent_weights()]
    float_accuracy = accuracy(model, reg, x_test, y_test)
    reg.project_()
    after = reg.report()
    totals = before.totals
    chips = []
    if reg.spec.bits is not None or reg.spec.mismatch:
        for seed in range(CHIPS):
            with reg.on_chip(seed):
                chips.append(accuracy(model, reg, x_test, y_test))
    return Outcome(
        float_accuracy=float_accuracy,
        projected_accuracy=accuracy(model, reg, x_test, y_test),
        mappable_before=before.is_mappable,
        mappable_after=after.is_mappable,
        out_of_range_fraction=totals["out_of_range"] / totals["numel"],
        mixed_block_column_fraction=totals["mixed_block_columns"] / totals["block_columns"],
        report_before=before,
        report_after=after,
        weights_before=weights_before,
        chip_accuracies=chips,
    )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(epochs: int, spec: ChipSpec = H1V2) -> tuple[dict[str, Outcome], Placement]:
    torch.manual_seed(SEED)
    data = digits()
    initial = SpikingNet(spec)
    placement = place(initial, data[2][:, :1], spec)
    outcomes = {}
    with one_thread():
        for name in RUNS:
            start = time.perf_counter()
            model = copy.deepcopy(initial)
            reg = register(model, spec)
            train(model, reg, data, epochs, name)
            outcomes[name] = evaluate(model, reg, data)
            if not sys.stderr.isatty():  # tqdm's bar shows progress on a terminal; elsewhere a line a run
                print(
                    f"{name}: {epochs} epochs in {time.perf_counter() - start:.1f} s, test accuracy "
                    f"{100 * outcomes[name].float_accuracy:.1f}% as trained, "
                    f"{100 * outcomes[name].projected_accuracy:.1f}% on the chip",
                    file=sys.stderr,
                    flush=True,
                )
    return outcomes, placement


def table(outcomes: dict[str, Outcome]) -> str:
    rows = [
        ("test accuracy as trained", lambda o: f"{100 * o.float_accuracy:.1f}%"),
        ("test accuracy on the chip (projected)", lambda o: f"{100 * o.projected_accuracy:.1f}%"),
        ("latent weights mappable as trained", lambda o: "yes" if o.mappable_before else "no"),
        ("latent weights out of range", lambda o: f"{100 * o.out_of_range_fraction:.2f}%"),
        ("latent mixed block columns", lambda o: f"{100 * o.mixed_block_column_fraction:.1f}%"),
        ("mappable after projection", lambda o: "yes" if o.mappable_after else "no"),
    ]
    if any(o.chip_accuracies for o in outcomes.values()):
        rows[2:2] = [
            (f"test accuracy on {CHIPS} chips, mean", lambda o: f"{100 * o.to_dict()['chip_accuracy_mean']:.1f}%"),
            (f"test accuracy on {CHIPS} chips, worst", lambda o: f"{100 * o.to_dict()['chip_accuracy_worst']:.1f}%"),
        ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}" + "".join(f"  {name:>11}" for name in outcomes)]
    for label, cell in rows:
        lines.append(f"{label:{width}}" + "".join(f"  {cell(o):>11}" for o in outcomes.values()))
    return "\n".join(lines)


COLORS = {"baseline": "tab:blue", "constrained": "tab:orange", "hardened": "tab:green"}


def plot(outcomes: dict[str, Outcome], placement: Placement, stream: BinaryIO, limit: float) -> None:
    """The picture, as PNG, into ``stream``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure = plt.figure(figsize=(15, 8.5))
    grid = figure.add_gridspec(2, len(outcomes))
    figure.suptitle("nwave-param demo: a spiking digits classifier built for the chip, trained three ways, then put on it")

    ax = figure.add_subplot(grid[0, 0])
    names = list(outcomes)
    positions = torch.arange(len(names)).float()
    trained = [100 * outcomes[n].float_accuracy for n in names]
    chip = [100 * outcomes[n].projected_accuracy for n in names]
    ax.bar(positions - 0.2, trained, width=0.38, color=[COLORS[n] for n in names], alpha=0.45, label="as trained")
    ax.bar(positions + 0.2, chip, width=0.38, color=[COLORS[n] for n in names], label="on the chip (projected)")
    for x, a, b in zip(positions.tolist(), trained, chip):
        ax.text(x - 0.2, a + 1, f"{a:.1f}", ha="center", fontsize=8)
        ax.text(x + 0.2, b + 1, f"{b:.1f}", ha="center", fontsize=8)
    ax.set_xticks(positions.tolist(), names)
    ax.set_ylim(0, 110)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy as trained and on the chip")
    ax.legend(fontsize=8, loc="lower left")

    ax = figure.add_subplot(grid[0, 1])
    layers = [row.name.removesuffix(".weight") for row in outcomes[names[0]].report_before.rows]
    positions = torch.arange(len(layers)).float()
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        rows = outcomes[name].report_before.rows
        mixed = [r.mixed_block_columns / max(r.block_columns, 1) for r in rows]
        ax.bar(positions + (k - (len(names) - 1) / 2) * width, mixed, width=width * 0.95, color=COLORS[name], label=name)
    ax.set_xticks(positions.tolist(), layers, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixed block columns (fraction)")
    ax.set_title("sign violations of the latent weights as trained\n(0 after projection)", fontsize=10)
    ax.legend(fontsize=8)

    ax = figure.add_subplot(grid[0, 2])
    cores = placement.spec.cores
    shades = plt.get_cmap("Set2")
    for core, capacity in enumerate(cores):
        ax.barh(core, capacity, color="none", edgecolor="grey", linestyle="--")
        filled = 0
        for k, population in enumerate(placement.populations):
            count = population.cores.get(core, 0)
            if count:
                ax.barh(core, count, left=filled, color=shades(k), edgecolor="white")
                ax.text(filled + count / 2, core, f"{population.name}\n{count}", ha="center", va="center", fontsize=8)
                filled += count
    ax.set_yticks(range(len(cores)), [f"core {i} ({n})" for i, n in enumerate(cores)])
    ax.invert_yaxis()
    ax.set_xlabel("neurons")
    kinds = ", ".join(f"{p.name}: {p.kind}" for p in placement.populations)
    ax.set_title(f"placement on the chip: {'fits' if placement.fits else 'does NOT fit'}\n{kinds}", fontsize=9)

    values = {name: torch.cat([w.flatten() for w in o.weights_before]).numpy() for name, o in outcomes.items()}
    low = min(float(v.min()) for v in values.values())
    high = max(float(v.max()) for v in values.values())
    bins = torch.linspace(min(low, -limit), max(high, limit), 121).numpy()
    first = None
    for k, name in enumerate(names):
        ax = figure.add_subplot(grid[1, k], sharex=first, sharey=first)
        first = first or ax
        ax.hist(values[name], bins=bins, color=COLORS[name])
        for x in (-limit, limit):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{name}: latent weights as trained (red: ±{limit})")
        ax.set_xlabel("weight")
        ax.set_ylabel("count (log)")
    figure.tight_layout()
    figure.savefig(stream, dpi=100, format="png")
    plt.close(figure)


def main(epochs: int, json_path: str | None, plot_path: str | None, chip: str = "h1v2", bits: int | None = None, mismatch: float = 0.0) -> int:
    """Train, write the JSON and the picture (all or none), then print the tables
    (``json_path="-"``: the JSON alone on stdout, the tables on stderr)."""
    spec = dataclasses.replace(CHIP_SPECS[chip], bits=bits, mismatch=mismatch)
    outcomes, placement = run(epochs, spec)
    data = {"chip": chip, "placement": placement.to_dict(), **{name: o.to_dict() for name, o in outcomes.items()}}
    with Outputs() as outputs:  # written before anything is printed: an interrupt until then leaves nothing
        if json_path not in (None, "-"):
            outputs.add_text(json_path, json.dumps(data, indent=2))
        if plot_path:
            outputs.add(plot_path, lambda stream: plot(outcomes, placement, stream, spec.limit))
        INTERRUPTIONS.defer()  # from here the demo completes: what it prints is what is on disk
        outputs.commit()
    shown = sys.stderr if json_path == "-" else sys.stdout
    print(table(outcomes), file=shown)
    print(f"\nthe network on the {chip.upper()} chip:", file=shown)
    print(placement, file=shown)
    print("\nhardened run, latent weights as trained:", file=shown)
    print(outcomes["hardened"].report_before, file=shown)
    if json_path == "-":
        print(json.dumps(data, indent=2))
    return 0
