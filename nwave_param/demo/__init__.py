"""``nwave-param demo``: a spiking network built for the chip, trained three ways, then put on it.

Two tasks, each input channel read by one front-end neuron:

* ``vowels``: spoken Japanese vowels, UCI's Japanese Vowels data (M. Kudo, J. Toyama and
  M. Shimbo, 1999; https://doi.org/10.24432/C5NS47; CC BY 4.0), shipped with the package
  (``nwave_param/demo/data``): nine speakers saying /ae/, each utterance 7 to 29 frames of 12 LPC
  cepstral coefficients, each frame shown for ``REPEAT`` time steps; the class is the speaker;
* ``digits`` (the default: the demo takes 84 s, the vowels 123 s, on the machine of the docs):
  scikit-learn's handwritten digits, each 8x8 image as 8 time steps of its 8 pixel rows and their
  complements (ON and OFF channels, as event sensors encode: 16 channels).

The network is one the chip can place (``nwp.place`` checks it, and the demo prints where each
population sits) and computes with the chip's own building blocks: ``nwp.FrontEnd`` (one gain per
channel, the front end's one-to-one synapses), a front-end population of ``nwp.ChipLeaky``
neurons, recurrent populations of ``nwp.ChipRLeaky`` neurons, each as large as its core (where
recurrent connections must stay) and fed by the front end, one on every core the front end and
the readout do not need (``hidden_sizes``: one of 100 on H1v2; on H1v1 two of 64 for the digits,
three for the vowels, whose front end and readout share a core), and ``READOUT_NEURONS`` (5)
spiking output neurons per class, read by spike counts: each class is one block of the chip.
The chip's neurons: membranes never below zero, the chip's reset, one threshold for all (``threshold_for``), and a
surrogate gradient that reaches ``SURROGATE_WIDTH`` thresholds (``surrogate_slope_for``).

Three runs start from one initialization (``--seed`` moves it and the batch order; the data split
stays fixed), each with the learning-rate schedule of :class:`nwave_param.Schedule`:

* **baseline**: the task loss alone;
* **constrained**: ``task + schedule.penalty()``, the hardness left at 0;
* **hardened**: the whole recipe, :class:`nwave_param.Schedule` with its defaults: the network
  ends training computing with exactly what the chip holds, so projecting it changes nothing.

Each run is then projected onto the chip with ``reg.project_()`` and evaluated again.  With
``--bits`` or ``--mismatch`` all three are registered under that spec (the hardened run trains
against the grid and the mismatch), and each is also evaluated on ``CHIPS`` chip instances
(``reg.on_chip(seed)``): the mean and the worst.

The networks are tiny: one intra-op thread computes them as fast as two, and does not slow to a
crawl when other processes share the CPU (spinning worker threads would), so the demo sets one
for its duration.

Needs the demo extra: ``pip install "nwave-param[demo]"`` (scikit-learn, snnTorch, matplotlib, tqdm).

The demo sits apart, above the parts: it may import the base, the core, the placement and the
command line's output helpers (:mod:`nwave_param.checkpoints.outputs`, ``guards``); only the
``demo`` command imports it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.resources
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from torch import nn

from nwave_param import blocks  # its neurons: snnTorch classes, made at first use
from nwave_param.blocks import FrontEnd
from nwave_param.checkpoints.guards import INTERRUPTIONS
from nwave_param.checkpoints.outputs import Outputs
from nwave_param.core.registry import Registry, register
from nwave_param.core.report import Report
from nwave_param.core.schedule import Schedule
from nwave_param.placement import Placement, place, regroup_
from nwave_param.spec import H1V1, H1V2, ChipSpec

CHIP_SPECS = {"h1v1": H1V1, "h1v2": H1V2}
CHIPS = 10
READOUT_NEURONS = 5  # per class: one block of the chip
REPEAT = 2  # time steps each vowel frame is shown for
# The chip has one threshold, its value not published; the weights' limits are in the same unit, so
# what matters is their ratio: a synapse at the limit moves a membrane LIMIT_IN_THRESHOLDS thresholds,
# on either chip (H1v2's threshold 1.0, H1v1's 0.54). Chosen on the validation split
# (docs/training-on-the-chip.md): the exact chip wants a low threshold, the device's spread a high one.
LIMIT_IN_THRESHOLDS = 1.66


# How far around the threshold the surrogate gradient reaches, in thresholds: fast_sigmoid's slope is
# 1 / (SURROGATE_WIDTH * threshold), the same shape on either chip. Chosen on the validation split
# (docs/training-on-the-chip.md): against a slope of 25, the hardened digits gained about two
# points on the chip there, their baselines unchanged.
SURROGATE_WIDTH = 0.2


def threshold_for(spec: ChipSpec) -> float:
    """The one threshold of the demo's neurons on ``spec``'s chip: ``spec.limit / LIMIT_IN_THRESHOLDS``."""
    return spec.limit / LIMIT_IN_THRESHOLDS


def surrogate_slope_for(spec: ChipSpec) -> float:
    """The slope of the demo neurons' surrogate gradient (``fast_sigmoid``) on ``spec``'s chip:
    ``1 / (SURROGATE_WIDTH * threshold_for(spec))``: 5 on H1v2, 9.2 on H1v1."""
    return 1 / (SURROGATE_WIDTH * threshold_for(spec))


SPLIT_SEED = 0  # the data split: fixed, whatever --seed
RUNS = ("baseline", "constrained", "hardened")


def _requirements():
    try:
        import snntorch  # noqa: F401
        import tqdm
        from snntorch import surrogate
    except ImportError as error:
        raise ImportError(f"the demo needs its extra: pip install 'nwave-param[demo]' ({error})") from None
    return surrogate, tqdm.tqdm


def _scikit_learn():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(f"the demo's digits need scikit-learn: pip install 'nwave-param[demo]' ({error})") from None
    return load_digits, train_test_split


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as error:
        raise ImportError(f"the demo's picture needs matplotlib: pip install 'nwave-param[demo]' ({error})") from None

    return pyplot


def import_libraries(task: str, plot: bool) -> None:
    """Import now the libraries a run of ``task`` (and its picture, with ``plot``) uses, so that
    the command line can hold its signals meanwhile, as while torch imports.

    Raises:
        ImportError: one of them is not installed.
    """
    _requirements()
    if task == "digits":
        _scikit_learn()
    if plot:
        _pyplot()


def hidden_sizes(spec: ChipSpec, feed_forward: tuple[int, ...]) -> list[int]:
    """The demo's recurrent populations on ``spec``'s chip, largest first: the smallest cores that
    together hold the ``feed_forward`` populations (the front end's and the readout's neurons;
    each may span cores and takes whole blocks of ``spec.group_size``, as the placer places it)
    are theirs, and every other core holds a recurrent population as large as it (recurrent
    connections stay within one core).  ``[100]`` on H1v2; on H1v1 ``[64, 64]`` for the digits (16 + 50 neurons need two cores)
    and ``[64, 64, 64]`` for the vowels (12 + 45 fit in one).

    Raises:
        ValueError: no core is left for a recurrent population.
    """
    cores, needed = sorted(spec.cores), sum(-(-neurons // spec.group_size) for neurons in feed_forward)  # in blocks
    taken = 0
    while taken < len(cores) and sum(core // spec.group_size for core in cores[:taken]) < needed:
        taken += 1
    if taken == len(cores):
        raise ValueError(
            f"demo: the front end and the readout ({' + '.join(map(str, feed_forward))} neurons) leave no core of {spec.cores} "
            "for a recurrent population; give the chip more cores"
        )
    return cores[taken:][::-1]


class Recurrent(nn.Module):
    """A recurrent population of ``nwp.ChipRLeaky`` neurons on one core: fed by the front end
    (``encode``), read by the output (``readout``)."""

    def __init__(self, channels: int, neurons: int, outputs: int, **neuron) -> None:
        super().__init__()
        self.encode = nn.Linear(channels, neurons)
        self.lif = blocks.ChipRLeaky(0.9, linear_features=neurons, **neuron)
        self.readout = nn.Linear(neurons, outputs)


class SpikingNet(nn.Module):
    """Front end (one neuron per input channel, fed one-to-one) -> recurrent populations, each fed
    by the front end, on every core the front end and the readout do not need (:func:`hidden_sizes`) ->
    spiking output, ``READOUT_NEURONS`` per class, read by spike counts."""

    def __init__(self, spec: ChipSpec = H1V2, channels: int = 12, classes: int = 9) -> None:
        super().__init__()
        surrogate, _ = _requirements()
        neuron = dict(
            learn_beta=True,
            threshold=threshold_for(spec),
            reset_mechanism=spec.reset or "subtract",
            spike_grad=surrogate.fast_sigmoid(slope=surrogate_slope_for(spec)),
        )
        self.classes = classes
        self.gain = FrontEnd(channels)
        self.front = blocks.ChipLeaky(0.9, **neuron)
        outputs = classes * READOUT_NEURONS
        self.hidden = nn.ModuleList(Recurrent(channels, size, outputs, **neuron) for size in hidden_sizes(spec, (channels, outputs)))
        self.out = blocks.ChipLeaky(0.9, **neuron)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (time, batch, channels)
        front, out = self.front.init_leaky(), self.out.init_leaky()
        states = [population.lif.init_rleaky() for population in self.hidden]  # (spikes, membrane) each
        counts = 0
        for x_t in x:
            front_spikes, front = self.front(self.gain(x_t), front)
            drive = 0
            for i, population in enumerate(self.hidden):
                states[i] = population.lif(population.encode(front_spikes), *states[i])
                drive = drive + population.readout(states[i][0])
            out_spikes, out = self.out(drive, out)
            counts = counts + out_spikes
        return counts.view(-1, self.classes, READOUT_NEURONS).sum(-1)  # spike counts per class


Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_train, y_train, x_test, y_test: x (time, samples, channels)


def digits() -> Data:
    """Images as (time=8, samples, 16): each row's 8 pixels in [0, 1] and their complements; a
    fixed stratified split (70/30)."""
    load_digits, train_test_split = _scikit_learn()
    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.images / 16.0, data.target, test_size=0.3, stratify=data.target, random_state=SPLIT_SEED
    )

    def channels(images):
        rows = torch.tensor(images, dtype=torch.float32).permute(1, 0, 2)  # (time, samples, pixels)
        return torch.cat([rows, 1 - rows], -1).contiguous()

    return channels(x_train), torch.tensor(y_train), channels(x_test), torch.tensor(y_test)


def vowels() -> Data:
    """Utterances as (time, samples, 12): each frame's coefficients standardized by the training
    set's per-channel mean and spread, shown for ``REPEAT`` steps, zero after the utterance ends;
    the file's own split (270 training utterances, 370 test)."""
    source = importlib.resources.files(__name__) / "data" / "japanese_vowels.pt"
    with source.open("rb") as stream:
        data = torch.load(stream, weights_only=True)
    frames = data["train"]["frames"]
    mean, std = frames.mean(0), frames.std(0)
    longest = max(int(split["lengths"].max()) for split in data.values())

    def utterances(split):
        padded = torch.zeros(longest, split["lengths"].numel(), frames.shape[1])
        for i, chunk in enumerate(((split["frames"] - mean) / std).split(split["lengths"].tolist())):
            padded[: chunk.shape[0], i] = chunk
        return padded.repeat_interleave(REPEAT, 0).contiguous(), split["labels"].clone()

    return (*utterances(data["train"]), *utterances(data["test"]))


@dataclass(frozen=True)
class Task:
    """A demo task: its data, its classes, and how it trains."""

    name: str
    load: Callable[[], Data]
    classes: int
    epochs: int
    learning_rate: float = 3e-3
    batch: int = 64


TASKS = {
    "vowels": Task("vowels", vowels, classes=9, epochs=60, batch=32),
    "digits": Task("digits", digits, classes=10, epochs=100),
}


def validation_split(data: Data, fraction: float = 0.2, fold: int = 0) -> Data:
    """The training set split into training and validation sets (stratified, fixed): what a rule
    is chosen on, never the test set.

    Each class's members, in a fixed shuffled order, fall into ``round(1 / fraction)`` folds of
    ``round(fraction * members)`` (the last takes the rest); ``fold`` is held out.  The folds
    partition the training set, so a rule can be validated on every training example once
    (k-fold), and fold 0 is the split the docs' validation runs used.

    Raises:
        ValueError: ``fold`` is not one of the ``round(1 / fraction)`` folds.
    """
    folds = round(1 / fraction)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"validation_split: fold must be an integer in [0, {folds}) for fraction {fraction}, got {fold!r}")
    x, y = data[0], data[1]
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    held = torch.zeros(y.numel(), dtype=torch.bool)
    for label in y.unique():
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        size = max(1, round(fraction * members.numel()))
        held[members[fold * size : (fold + 1) * size if fold < folds - 1 else None]] = True
    return x[:, ~held], y[~held], x[:, held], y[held]


@torch.no_grad()
def accuracy(model: nn.Module, reg: Registry, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with reg.cached():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, reg: Registry, data: Data, task: Task, epochs: int, run: str, seed: int, **rule) -> None:
    """One run: ``baseline`` (the task loss), ``constrained`` (and the penalty), ``hardened`` (the
    whole :class:`Schedule`); ``rule`` overrides the Schedule's defaults (for studying them)."""
    _, progress = _requirements()
    x_train, y_train, *_ = data
    optimizer = torch.optim.Adam(model.parameters(), lr=task.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-x_train.shape[1] // task.batch)
    schedule = Schedule(reg, steps, optimizer, **({"harden": None} if run != "hardened" else {}), **rule)
    bar = progress(range(epochs), desc=run, leave=False, disable=None)  # a bar on a terminal only
    model.train()
    for _ in bar:
        for batch in torch.randperm(x_train.shape[1], generator=generator).split(task.batch):
            if schedule.steps == schedule.regroup_step:
                regroup_(model, x_train[:, batch], optimizer)
            with reg.cached():
                loss = nn.functional.cross_entropy(model(x_train[:, batch]), y_train[batch])
                if run != "baseline":
                    loss = loss + schedule.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
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
    chip_accuracies: list[float] = field(default_factory=list)  # on CHIPS chip instances, with a spec that has bits or mismatch

    KEYS = (
        "float_accuracy", "projected_accuracy", "mappable_before", "mappable_after", "out_of_range_fraction", "mixed_block_column_fraction"
    )

    def to_dict(self) -> dict:
        result = {key: getattr(self, key) for key in self.KEYS}
        if self.chip_accuracies:
            result["chip_accuracy_mean"] = sum(self.chip_accuracies) / len(self.chip_accuracies)
            result["chip_accuracy_worst"] = min(self.chip_accuracies)
        return result


def evaluate(model: nn.Module, reg: Registry, x_test: torch.Tensor, y_test: torch.Tensor) -> Outcome:
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


def run(
    epochs: int | None = None, spec: ChipSpec = H1V2, task: str = "digits", seed: int = 0, runs=RUNS, validation: bool = False,
    fold: int = 0, **rule
) -> tuple[dict[str, Outcome], Placement]:
    """Train ``runs`` from one initialization (``seed``), each evaluated on the test set (on a
    validation split of the training set, with ``validation``), and the network's placement.

    Args:
        epochs: training epochs per run; None: the task's own (``TASKS[task].epochs``).
        spec: the chip the network is built for, registered with and placed on.
        task: ``"digits"`` or ``"vowels"`` (a key of ``TASKS``).
        seed: the initialization and the batch order (the data split stays fixed).
        runs: which runs, of ``RUNS`` (``baseline``, ``constrained``, ``hardened``).
        validation: evaluate on a validation split of the training set, not on the test set.
        fold: with ``validation``, which of the five validation folds is held out (:func:`validation_split`).
        **rule: overrides of the :class:`~nwave_param.Schedule`'s defaults (for studying them).

    Returns:
        ``(outcomes, placement)``: each run's :class:`Outcome` by its name, and the network's
        :class:`~nwave_param.Placement` on ``spec``.

    Raises:
        ImportError: the demo extra (scikit-learn, snnTorch, tqdm) is not installed.
        ValueError: ``task`` is not a key of ``TASKS``, or ``fold`` is not one of the folds (or is
            given without ``validation``).
    """
    if task not in TASKS:
        raise ValueError(f"demo.run: task must be one of {', '.join(TASKS)}, got {task!r}")
    if fold and not validation:
        raise ValueError(f"demo.run: fold={fold!r} holds out a fold of the training set; pass validation=True (the test set has no folds)")
    chosen = TASKS[task]
    data = chosen.load()
    if validation:
        data = validation_split(data, fold=fold)
    epochs = chosen.epochs if epochs is None else epochs
    torch.manual_seed(seed)
    initial = SpikingNet(spec, data[0].shape[-1], chosen.classes)
    placement = place(initial, data[2][:, :1], spec)
    outcomes = {}
    with one_thread():
        for name in runs:
            start = time.perf_counter()
            model = copy.deepcopy(initial)
            reg = register(model, spec)
            train(model, reg, data, chosen, epochs, name, seed, **rule)
            outcomes[name] = evaluate(model, reg, data[2], data[3])
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
    plt = _pyplot()
    figure = plt.figure(figsize=(15, 8.5))
    grid = figure.add_gridspec(2, len(outcomes))
    figure.suptitle("nwave-param demo: a spiking classifier built for the chip, trained three ways, then put on it")

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


def main(
    epochs: int | None, json_path: str | None, plot_path: str | None, chip: str = "h1v2", bits: int | None = None,
    mismatch: float = 0.0, task: str = "digits", seed: int = 0,
) -> int:
    """Train, write the JSON and the picture (all or none), then print the tables
    (``json_path="-"``: the JSON alone on stdout, the tables on stderr).

    Args:
        epochs: training epochs per run; None: the task's own.
        json_path: where to write the numbers as JSON; ``"-"``: stdout; None: nowhere.
        plot_path: where to write the picture (PNG); None: nowhere.
        chip: ``"h1v1"`` or ``"h1v2"`` (a key of ``CHIP_SPECS``).
        bits: the weight grid's bits; None: no grid.
        mismatch: the standard deviation of the noise on each weight.
        task: ``"digits"`` or ``"vowels"``.
        seed: the initialization and the batch order.

    Returns:
        The exit status, 0.

    Raises:
        ImportError: the demo extra (scikit-learn, snnTorch, matplotlib, tqdm) is not installed.
        ValueError: ``chip`` or ``task`` is not a known one, or ``bits`` or ``mismatch`` is out of
            its domain (:class:`~nwave_param.ChipSpec`).
        CheckpointError: an output cannot be written; then none is.
    """
    if chip not in CHIP_SPECS:
        raise ValueError(f"demo.main: chip must be one of {', '.join(CHIP_SPECS)}, got {chip!r}")
    spec = CHIP_SPECS[chip].replace(bits=bits, mismatch=mismatch)
    outcomes, placement = run(epochs, spec, task, seed)
    data = {
        "task": task, "seed": seed, "chip": chip, "placement": placement.to_dict(), **{name: o.to_dict() for name, o in outcomes.items()}
    }
    with Outputs() as outputs:  # written before anything is printed: an interrupt until then leaves nothing
        if json_path not in (None, "-"):
            outputs.add_text(json_path, json.dumps(data, indent=2))
        if plot_path:
            outputs.add(plot_path, lambda stream: plot(outcomes, placement, stream, spec.limit))
        INTERRUPTIONS.complete_from_here()  # a signal some library swallowed still stops it; else what it prints is what is on disk
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
