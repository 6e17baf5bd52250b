"""``nwave-param demo``: does a spiking network trained with the penalties survive the chip?

Trains a small recurrent spiking network (snnTorch ``RLeaky``, all-to-all recurrence, surrogate
gradient) on scikit-learn's handwritten digits (each 8x8 image read as 8 time steps of 8 inputs)
twice from the same initialization: a baseline on the task loss alone, and a constrained run
with ``reg.penalty()`` in the loss.  Then it snaps both onto the chip with ``reg.project_()`` and
compares test accuracy before and after.

Penalty schedule (constrained run): ``loss = task + scale(epoch) * reg.penalty()`` with
``scale`` rising linearly from 0 to ``PENALTY_SCALE`` over the first half of the epochs and
held there: the network first learns the task, then is steered onto the chip while it can still
repair what the penalty costs.

Needs the demo extra: ``pip install "nwave-param[demo]"`` (scikit-learn, snnTorch, matplotlib, tqdm).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import torch
from torch import nn

from .registry import Registry, register
from .report import Report

PENALTY_SCALE = 20.0
HIDDEN = 128
INPUT_GAIN = 4.0  # pixel intensities in [0, 1] drive the neurons past threshold
SEED = 0


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


class SpikingNet(nn.Module):
    """Input Linear -> leaky integrate-and-fire layer with all-to-all recurrence -> readout."""

    def __init__(self, inputs: int = 8, hidden: int = HIDDEN, classes: int = 10) -> None:
        super().__init__()
        snntorch, surrogate, *_ = _requirements()
        self.encode = nn.Linear(inputs, hidden)
        self.lif = snntorch.RLeaky(
            beta=0.9, learn_beta=True, linear_features=hidden, spike_grad=surrogate.fast_sigmoid(slope=25)
        )
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (time, batch, inputs)
        spk, mem = self.lif.init_rleaky()
        logits = 0
        for x_t in x:
            spk, mem = self.lif(self.encode(INPUT_GAIN * x_t), spk, mem)
            logits = logits + self.readout(spk)
        return logits / x.shape[0]


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
    with reg.cached():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, reg: Registry, data, epochs: int, constrained: bool, label: str) -> None:
    *_, progress, _, _ = _requirements()
    x_train, y_train, *_ = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(SEED)
    bar = progress(range(epochs), desc=label, leave=False, disable=None)  # shown on a terminal only
    for epoch in bar:
        scale = PENALTY_SCALE * min(1.0, epoch / max(1, epochs // 2)) if constrained else 0.0
        for batch in torch.randperm(x_train.shape[1], generator=generator).split(64):
            with reg.cached():
                task = nn.functional.cross_entropy(model(x_train[:, batch]), y_train[batch])
            loss = task + scale * reg.penalty() if constrained else task
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        bar.set_postfix(task=f"{task.item():.3f}")


@dataclass
class Outcome:
    float_accuracy: float
    projected_accuracy: float
    mappable_before: bool
    out_of_range_fraction: float
    mixed_group_fraction: float
    report_before: Report
    report_after: Report
    weights_before: list[torch.Tensor]

    def to_dict(self) -> dict:
        keys = ("float_accuracy", "projected_accuracy", "mappable_before", "out_of_range_fraction", "mixed_group_fraction")
        return {key: getattr(self, key) for key in keys}


def evaluate(model: nn.Module, reg: Registry, data) -> Outcome:
    *_, x_test, y_test = data
    before = reg.report()
    weights_before = [w.detach().clone() for w in reg.weights()]
    float_accuracy = accuracy(model, reg, x_test, y_test)
    reg.project_()
    totals = before.totals
    return Outcome(
        float_accuracy=float_accuracy,
        projected_accuracy=accuracy(model, reg, x_test, y_test),
        mappable_before=before.is_mappable,
        out_of_range_fraction=totals["out_of_range"] / totals["numel"],
        mixed_group_fraction=totals["mixed_block_columns"] / totals["block_columns"],
        report_before=before,
        report_after=reg.report(),
        weights_before=weights_before,
    )


def run(epochs: int) -> dict[str, Outcome]:
    torch.manual_seed(SEED)
    data = digits()
    initial = SpikingNet()
    outcomes = {}
    for name, constrained in (("baseline", False), ("constrained", True)):
        model = copy.deepcopy(initial)
        reg = register(model)
        train(model, reg, data, epochs, constrained, name)
        outcomes[name] = evaluate(model, reg, data)
    return outcomes


def table(outcomes: dict[str, Outcome]) -> str:
    rows = [
        ("test accuracy as trained", lambda o: f"{100 * o.float_accuracy:.1f}%"),
        ("mappable as trained", lambda o: "yes" if o.mappable_before else "no"),
        ("out-of-range weights", lambda o: f"{100 * o.out_of_range_fraction:.2f}%"),
        ("mixed block columns", lambda o: f"{100 * o.mixed_group_fraction:.1f}%"),
        ("test accuracy after projection", lambda o: f"{100 * o.projected_accuracy:.1f}%"),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"{'':{width}}  {'baseline':>11}  {'constrained':>11}"]
    for label, cell in rows:
        lines.append(f"{label:{width}}  {cell(outcomes['baseline']):>11}  {cell(outcomes['constrained']):>11}")
    return "\n".join(lines)


def plot(outcomes: dict[str, Outcome], path: str, limit: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, name in zip(axes[:2], ("baseline", "constrained")):
        outcome = outcomes[name]
        weights = torch.cat([w.flatten() for w in outcome.weights_before])
        ax.hist(weights.numpy(), bins=120, color="tab:blue" if name == "baseline" else "tab:green")
        for x in (-limit, limit):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_title(f"{name}: weights as trained (red: +-{limit})")
        ax.set_xlabel("weight")
    ax = axes[2]
    names = [row.name for row in outcomes["baseline"].report_before.rows]
    positions = torch.arange(len(names)).float()
    for offset, (name, color) in zip((-0.2, 0.2), (("baseline", "tab:blue"), ("constrained", "tab:green"))):
        outcome = outcomes[name]
        before = [r.mixed_block_columns / max(r.block_columns, 1) for r in outcome.report_before.rows]
        ax.bar(positions + offset, before, width=0.38, color=color, label=f"{name} as trained")
        after = sum(r.mixed_block_columns for r in outcome.report_after.rows)
        ax.plot([], [], " ", label=f"{name} after projection: {after} mixed")
    ax.set_xticks(positions.tolist(), names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("mixed block columns (fraction)")
    ax.set_title("per-layer sign violations")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(epochs: int, json_path: str | None, plot_path: str | None) -> int:
    outcomes = run(epochs)
    print(table(outcomes))
    print("\nconstrained model, as trained:")
    print(outcomes["constrained"].report_before)
    if json_path:
        with open(json_path, "w") as stream:
            json.dump({name: o.to_dict() for name, o in outcomes.items()}, stream, indent=2)
    if plot_path:
        plot(outcomes, plot_path, outcomes["constrained"].report_before.spec.limit)
    return 0
