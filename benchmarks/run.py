"""nwave_param's speed, as ratios against comparisons measured in the same run.

    python benchmarks/run.py            # the full table (a few minutes)
    python benchmarks/run.py --quick    # a smoke run
    python benchmarks/run.py --json results.json

Every figure is a ratio of medians over interleaved rounds (each round times every variant once,
so a noisy neighbour slows all of them alike).  Absolute times mean little on a shared machine.

1. ``reg.penalty()`` forward + backward against
   - the floor: one L1 reduction over the same weights (``torch._foreach_norm``), forward + backward;
   - a naive functional loss written plainly below (per module, per term, per block: separate ops);
   - rockpool's ``bounds_cost`` (magnitude only), when rockpool is installed.
2. The first call's cost (building the C kernels), in a fresh process with an empty cache.
3. The training-step overhead of registration: a recurrent net unrolled over 50 steps, forward
   inside ``reg.cached()``, against the same net unregistered (task loss only).
4. Peak memory of the penalty's forward + backward on the largest model against the floor's,
   each in a fresh process (extra resident memory over the process's baseline).
5. ``reg.report()`` and ``reg.project_()`` on the largest model, against the floor.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

import nwave_param as nwp

LIMIT, GROUP = 0.9, 5


def models() -> dict[str, nn.Module]:
    return {
        "100 x Linear(64, 64)": nn.Sequential(*[nn.Linear(64, 64) for _ in range(100)]),
        "recurrent 40-256-10": RecurrentNet(),
        "6 x Linear(512, 512)": nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)]),
        "4 x Linear(2048, 2048)": nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]),
    }


class RecurrentNet(nn.Module):
    """Linear(40, 256) -> tanh recurrence through Linear(256, 256) -> Linear(256, 10), unrolled."""

    def __init__(self) -> None:
        super().__init__()
        self.input = nn.Linear(40, 256)
        self.recurrent = nn.Linear(256, 256)
        self.readout = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (time, batch, 40)
        h = x.new_zeros(x.shape[1], 256)
        logits = 0
        for x_t in x:
            h = torch.tanh(self.input(x_t) + self.recurrent(h))
            logits = logits + self.readout(h)
        return logits


def naive_loss(model: nn.Module) -> torch.Tensor:
    """The vendor SDK's first version: per module, per term, per block, separate ops."""
    magnitude, topology, count = 0.0, 0.0, 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            count += w.numel()
            magnitude = magnitude + torch.relu(w.abs() - LIMIT).pow(2).sum()
            for start in range(0, w.shape[0], GROUP):
                block = w[start : start + GROUP]
                topology = topology + torch.minimum(torch.relu(block).sum(0), torch.relu(-block).sum(0)).sum()
    return magnitude / count + topology / count


def rockpool_cost():
    try:
        from rockpool.training.torch_loss import bounds_cost
    except Exception:  # not installed, or an incompatible version
        return None
    return bounds_cost


def clear(weights):
    for w in weights:
        w.grad = None


def interleaved(variants: dict, rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each variant, over rounds that time every variant in turn."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        fn()  # warm up
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat)
    return {name: statistics.median(values) for name, values in times.items()}


def penalty_figures(name: str, model: nn.Module, rounds: int, repeat: int) -> dict:
    reg = nwp.register(model)
    weights = reg.weights()
    bounds_cost = rockpool_cost()

    def floor():
        clear(weights)
        torch.stack(torch._foreach_norm(weights, 1)).sum().backward()

    def penalty():
        clear(weights)
        reg.penalty().backward()

    def naive():
        clear(weights)
        naive_loss(model).backward()

    variants = {"floor": floor, "penalty": penalty, "naive": naive}
    if bounds_cost is not None:
        variants["rockpool"] = lambda: (clear(weights), bounds_cost(model).backward())
    big = sum(w.numel() for w in weights) > 1_000_000
    times = interleaved(variants, rounds, max(1, repeat // 10) if big else repeat)
    row = {
        "model": name,
        "floor_ms": times["floor"] * 1e3,
        "penalty_ms": times["penalty"] * 1e3,
        "penalty_vs_floor": times["penalty"] / times["floor"],
        "naive_vs_penalty": times["naive"] / times["penalty"],
    }
    if "rockpool" in times:
        row["rockpool_vs_penalty"] = times["rockpool"] / times["penalty"]
    return row


def training_overhead(batch: int, rounds: int, repeat: int) -> dict:
    torch.manual_seed(0)
    plain = RecurrentNet()
    registered = copy.deepcopy(plain)
    reg = nwp.register(registered)
    x, y = torch.randn(50, batch, 40), torch.randint(0, 10, (batch,))

    def step_plain():
        plain.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(x), y).backward()

    def step_registered():
        registered.zero_grad(set_to_none=True)
        with reg.cached():
            out = registered(x)
        nn.functional.cross_entropy(out, y).backward()

    times = interleaved({"plain": step_plain, "registered": step_registered}, rounds, repeat)
    return {"batch": batch, "plain_ms": times["plain"] * 1e3, "overhead": times["registered"] / times["plain"] - 1}


def lifecycle_figures(rounds: int) -> dict:
    model = models()["4 x Linear(2048, 2048)"]
    reg = nwp.register(model)
    weights = reg.weights()

    def floor():
        clear(weights)
        torch.stack(torch._foreach_norm(weights, 1)).sum().backward()

    times = interleaved({"floor": floor, "report": reg.report, "project_": reg.project_}, rounds, 1)
    return {"report_vs_floor": times["report"] / times["floor"], "project_vs_floor": times["project_"] / times["floor"]}


def first_call() -> dict:
    """A fresh process with an empty kernel cache: registration + the first penalty forward/backward."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NWAVE_PARAM_CACHE": cache}
        out = subprocess.run(
            [sys.executable, __file__, "--probe", "first-call"], env=env, capture_output=True, text=True, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory() -> dict:
    extra = {}
    for variant in ("floor", "penalty"):
        out = subprocess.run([sys.executable, __file__, "--probe", variant], capture_output=True, text=True, check=True)
        extra[variant] = json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]
    return {"floor_extra_mb": extra["floor"], "penalty_extra_mb": extra["penalty"], "ratio": extra["penalty"] / extra["floor"]}


def probe(variant: str) -> None:
    """Runs in a fresh process: one measurement, printed as a JSON line."""
    model = models()["4 x Linear(2048, 2048)"]
    reg = nwp.register(model)
    weights = reg.weights()
    if variant == "first-call":
        start = time.perf_counter()
        reg.penalty().backward()
        print(json.dumps({"first_call_s": time.perf_counter() - start}))
        return
    warm = nwp.register(nn.Linear(8, 8))  # build/load the kernels before the baseline is read
    warm.penalty().backward()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak resident size (VmHWM) to the current one
    baseline = _status_mb("VmHWM")
    if variant == "floor":
        torch.stack(torch._foreach_norm(weights, 1)).sum().backward()
    else:
        reg.penalty().backward()
    print(json.dumps({"extra_mb": _status_mb("VmHWM") - baseline}))


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    with open("/proc/self/status") as status:
        kilobytes = next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    return kilobytes / 1024


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rounds")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe)

    torch.manual_seed(0)
    rounds, repeat = (2, 2) if args.quick else (15, 20)
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "penalty": [penalty_figures(name, model, rounds, repeat) for name, model in models().items()],
        "training_overhead": [training_overhead(b, rounds, max(1, repeat // 4)) for b in (32, 1)],
        "lifecycle": lifecycle_figures(rounds if args.quick else 7),
        "first_call": first_call(),
        "memory": memory(),
    }
    print(f"machine: {results['machine']}\n")
    print("1. reg.penalty() forward + backward (ratios; lower is better for penalty_vs_floor)")
    columns = ["model", "floor_ms", "penalty_ms", "penalty_vs_floor", "naive_vs_penalty"]
    if any("rockpool_vs_penalty" in r for r in results["penalty"]):
        columns.append("rockpool_vs_penalty")
    print(table(results["penalty"], columns))
    print(f"\n2. first call (kernel build + first forward/backward, largest model): {results['first_call']['first_call_s']:.2f} s")
    print("\n3. training-step overhead of registration (recurrent net, 50 steps, reg.cached())")
    print(table([{**r, "overhead": f"{100 * r['overhead']:+.1f}%"} for r in results["training_overhead"]], ["batch", "plain_ms", "overhead"]))
    m = results["memory"]
    print(f"\n4. peak extra memory, largest model: penalty {m['penalty_extra_mb']:.0f} MB, floor {m['floor_extra_mb']:.0f} MB, ratio {m['ratio']:.2f}")
    lc = results["lifecycle"]
    print(f"\n5. largest model, against the floor: report() {lc['report_vs_floor']:.2f}x, project_() {lc['project_vs_floor']:.2f}x")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
