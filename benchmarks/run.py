"""nwave_param's speed, as ratios against comparisons measured in the same run.

    python benchmarks/run.py                 # the full table (a few minutes)
    python benchmarks/run.py --load 2        # the same with 2 busy processes sharing the CPU
    python benchmarks/run.py --quick         # a smoke run: one tiny model, few rounds
    python benchmarks/run.py --json out.json

Every figure is a ratio of medians over interleaved rounds (each round times every variant once,
so a noisy neighbour slows all of them alike), and each model runs in a fresh process, so that
one model's memory does not shape another's timings.  Absolute times mean little on a shared
machine, and figures vary by CPU: the header names the one they came from.

1. ``reg.penalty()`` forward + backward, against
   - the floor: one L1 reduction over the same weights (``torch._foreach_norm``), forward + backward;
   - rockpool's ``bounds_cost`` (magnitude only), when rockpool is installed;
   - a naive loss written plainly below (per module, per term, per block: separate ops).
2. One training step of the demo network (forward + backward + Adam step, batch 64): task loss
   plus ``reg.penalty()`` against task loss alone, and against the unregistered network.
3. The first call in a fresh process (``import``, ``register`` and the first penalty forward +
   backward on the largest model), in seconds.
4. ``reg.report()`` and ``reg.project_()`` on the largest model, against the floor.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

LIMIT, GROUP = 0.9, 5
MODELS = ["100 x Linear(64, 64)", "recurrent 40-256-10", "6 x Linear(512, 512)", "4 x Linear(2048, 2048)"]


def build(name: str):
    from torch import nn

    class RecurrentNet(nn.Module):
        """Linear(40, 256) -> tanh recurrence through Linear(256, 256) -> Linear(256, 10)."""

        def __init__(self) -> None:
            super().__init__()
            self.input = nn.Linear(40, 256)
            self.recurrent = nn.Linear(256, 256)
            self.readout = nn.Linear(256, 10)

    return {
        "100 x Linear(64, 64)": lambda: nn.Sequential(*[nn.Linear(64, 64) for _ in range(100)]),
        "recurrent 40-256-10": RecurrentNet,
        "6 x Linear(512, 512)": lambda: nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)]),
        "4 x Linear(2048, 2048)": lambda: nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(4)]),
    }[name]()


def naive_loss(model):
    """The vendor SDK's first version: per module, per term, per block, separate ops."""
    import torch
    from torch import nn

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


def interleaved(variants: dict, rounds: int, repeat: int) -> dict[str, float]:
    """Median seconds per call of each variant, over rounds that time every variant in turn."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(2):
            fn()  # warm up: plans, workspaces, allocator
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat)
    return {name: statistics.median(values) for name, values in times.items()}


def machine() -> dict:
    import torch

    model = platform.processor() or platform.machine()
    try:  # a virtual machine may show only "AMD EPYC": family and model tell the generation
        with open("/proc/cpuinfo") as info:
            fields = dict(line.split(":", 1) for line in info.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        model = f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
    except (OSError, KeyError):
        pass
    return {
        "cpu": model,
        "simd": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# --- probes: each runs in a fresh process and prints one JSON line ---------------------------


def probe_penalty(name: str, rounds: int) -> dict:
    import torch

    import nwave_param as nwp

    torch.manual_seed(0)
    model = build(name)
    reg = nwp.register(model)
    weights = reg.weights()

    def clear():
        for w in weights:
            w.grad = None

    def floor():
        clear()
        torch.stack(torch._foreach_norm(weights, 1)).sum().backward()

    def penalty():
        clear()
        reg.penalty().backward()

    def naive():
        clear()
        naive_loss(model).backward()

    variants = {"floor": floor, "penalty": penalty, "naive": naive}
    try:
        from rockpool.training.torch_loss import bounds_cost
    except ImportError:
        bounds_cost = None
    if bounds_cost is not None:
        params = dict(zip(reg.names, weights))
        lower, upper = ({n: torch.full_like(w, bound) for n, w in params.items()} for bound in (-LIMIT, LIMIT))
        variants["rockpool"] = lambda: (clear(), bounds_cost(params, lower, upper).backward())
    elements = sum(w.numel() for w in weights)
    repeat = max(1, min(200, 4_000_000 // elements))
    times = interleaved(variants, rounds, repeat)
    row = {"model": name, "floor_ms": times["floor"] * 1e3, "penalty_ms": times["penalty"] * 1e3}
    row["penalty_vs_floor"] = times["penalty"] / times["floor"]
    row["naive_vs_penalty"] = times["naive"] / times["penalty"]
    if "rockpool" in times:
        row["rockpool_vs_penalty"] = times["rockpool"] / times["penalty"]
    return row


def probe_training(rounds: int, steps: int) -> dict:
    import copy

    import torch
    from torch import nn

    import nwave_param as nwp
    from nwave_param import demo

    torch.manual_seed(0)
    x = torch.rand(8, 64, 8)
    y = torch.randint(0, 10, (64,))
    plain = demo.SpikingNet()
    registered = copy.deepcopy(plain)
    reg = nwp.register(registered)

    def make_step(model, penalty: bool):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            for _ in range(steps):
                with reg.cached():
                    loss = nn.functional.cross_entropy(model(x), y)
                if penalty:
                    loss = loss + reg.penalty()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        return step

    times = interleaved(
        {
            "plain": make_step(plain, False),
            "task": make_step(registered, False),
            "task+penalty": make_step(registered, True),
        },
        rounds,
        1,
    )
    return {
        "network": "demo SpikingNet 8-128-10, 8 time steps, batch 64",
        "plain_step_ms": times["plain"] * 1e3 / steps,
        "penalty_overhead": times["task+penalty"] / times["task"] - 1,
        "overhead_vs_unregistered": times["task+penalty"] / times["plain"] - 1,
    }


def probe_first_call(name: str, started: float) -> dict:
    import torch

    import nwave_param as nwp

    imported = time.perf_counter()
    model = build(name)
    begin = time.perf_counter()
    nwp.register(model).penalty().backward()
    end = time.perf_counter()
    del torch
    return {"model": name, "import_s": imported - started, "first_call_s": end - begin, "total_s": end - started}


def probe_lifecycle(name: str, rounds: int) -> dict:
    import torch

    import nwave_param as nwp

    torch.manual_seed(0)
    reg = nwp.register(build(name))
    weights = reg.weights()

    def floor():
        for w in weights:
            w.grad = None
        torch.stack(torch._foreach_norm(weights, 1)).sum().backward()

    times = interleaved({"floor": floor, "report": reg.report, "project_": reg.project_}, rounds, 1)
    return {"model": name, "report_vs_floor": times["report"] / times["floor"], "project_vs_floor": times["project_"] / times["floor"]}


def run_probe(*args: str) -> dict:
    env = {**os.environ, "NWAVE_BENCH_STARTED": repr(time.perf_counter())}
    out = subprocess.run([sys.executable, __file__, "--probe", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"probe {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spin() -> None:
    while True:
        pass


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: one tiny model, few rounds")
    parser.add_argument("--load", type=int, default=0, metavar="N", help="keep N busy processes running meanwhile")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        kind, *rest = args.probe
        if kind == "penalty":
            result = probe_penalty(rest[0], int(rest[1]))
        elif kind == "training":
            result = probe_training(int(rest[0]), int(rest[1]))
        elif kind == "first-call":
            result = probe_first_call(rest[0], float(os.environ["NWAVE_BENCH_STARTED"]))
        else:
            result = probe_lifecycle(rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for process in busy:
        process.start()
    try:
        models = MODELS[1:2] if args.quick else MODELS
        rounds = 3 if args.quick else 21
        results = {
            "machine": {**machine(), "load": args.load},
            "penalty": [run_probe("penalty", name, str(rounds)) for name in models],
            "training": run_probe("training", str(rounds), "1" if args.quick else "3"),
            "first_call": run_probe("first-call", models[-1]),
            "lifecycle": run_probe("lifecycle", models[-1], "3" if args.quick else "7"),
        }
    finally:
        for process in busy:
            process.terminate()
    m = results["machine"]
    print(f"machine: {m['cpu']} ({m['simd']}), {m['cores']} cores, torch {m['torch']}, load {m['load']}\n")
    print("1. reg.penalty() forward + backward (penalty_vs_floor: lower is better; the others: higher is better)")
    columns = ["model", "floor_ms", "penalty_ms", "penalty_vs_floor", "naive_vs_penalty"]
    if any("rockpool_vs_penalty" in r for r in results["penalty"]):
        columns.append("rockpool_vs_penalty")
    print(table(results["penalty"], columns))
    t = results["training"]
    print(
        f"\n2. training step, {t['network']}: {t['plain_step_ms']:.2f} ms unregistered; the penalty adds "
        f"{100 * t['penalty_overhead']:+.1f}% ({100 * t['overhead_vs_unregistered']:+.1f}% against the unregistered network)"
    )
    f = results["first_call"]
    print(f"\n3. first call in a fresh process ({f['model']}): {f['first_call_s']:.2f} s (import {f['import_s']:.2f} s)")
    lc = results["lifecycle"]
    print(f"\n4. {lc['model']}, against the floor: report() {lc['report_vs_floor']:.2f}x, project_() {lc['project_vs_floor']:.2f}x")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
