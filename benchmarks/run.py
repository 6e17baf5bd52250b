"""nwave_param's speed, as ratios against comparisons measured in the same run.

    python benchmarks/run.py                 # the full table (a few minutes)
    python benchmarks/run.py --load 2        # the same with 2 busy processes sharing the CPU
    python benchmarks/run.py --quick         # a smoke run: the smallest models, few rounds
    python benchmarks/run.py --json out.json

Every figure is a ratio of medians over interleaved rounds (each round times every variant once,
in a fresh random order, so a noisy neighbour slows all of them alike), with one intra-op thread,
and each model runs in a fresh process, so that one model's memory does not shape another's
timings.  Absolute times mean little on a shared machine, and figures vary by CPU: the header
names the one they came from.

1. The recipe a user runs, one training step: the forward inside ``reg.cached()``, task loss plus
   ``reg.penalty()``, backward and an Adam step, against the same step on the unregistered model;
   registered at hardness 0 (no penalty), with the penalty, at hardness 1 with the penalty, and at
   hardness 1 with a 5-bit grid and 0.02 mismatch.
2. ``reg.penalty()`` forward + backward, against
   - the floor: one L1 reduction over the same weights (``torch._foreach_norm``), forward + backward;
   - rockpool's ``bounds_cost`` (magnitude only), when rockpool is installed;
   - a naive loss written plainly below (per module, per term, per block: separate ops).
3. The first call in a fresh process (``import``, ``register`` and the first penalty forward +
   backward on the largest model), in seconds.
4. ``reg.report()`` and ``reg.project_()`` on the largest model, against the floor.

Beside 1 and 2, the number of ops dispatched per call as a GPU would launch them (the plan for a
device other than the CPU, forced): deterministic, and what a GPU user can read on any machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import time

LIMIT, GROUP = 0.9, 5
PENALTY_MODELS = ["100 x Linear(64, 64)", "recurrent 40-256-10", "6 x Linear(512, 512)", "4 x Linear(2048, 2048)"]
RECIPE_MODELS = ["RNN 16-100-50", "24 x Linear(64, 64)"]
VARIANTS = ["registered, h=0", "+ penalty", "h=1 + penalty", "h=1 + penalty, bits=5, mismatch=0.02"]


def build(name: str):
    """The model, and for the recipe models an input batch, labels and the number of classes."""
    import torch
    from torch import nn

    class Recurrent(nn.Module):
        """Linear(inputs, hidden) -> tanh recurrence through Linear(hidden, hidden) -> Linear(hidden, outputs)."""

        def __init__(self, inputs: int, hidden: int, outputs: int) -> None:
            super().__init__()
            self.input = nn.Linear(inputs, hidden)
            self.recurrent = nn.Linear(hidden, hidden, bias=False)
            self.readout = nn.Linear(hidden, outputs)

        def forward(self, x):  # (time, batch, inputs)
            h = torch.zeros(x.shape[1], self.recurrent.in_features)
            for x_t in x:
                h = torch.tanh(self.input(x_t) + self.recurrent(h))
            return self.readout(h)

    torch.manual_seed(0)
    if name == "RNN 16-100-50":
        return Recurrent(16, 100, 50), torch.randn(25, 32, 16), torch.randint(0, 50, (32,))
    if name == "24 x Linear(64, 64)":
        layers = [m for _ in range(24) for m in (nn.Linear(64, 64), nn.Tanh())]
        return nn.Sequential(*layers), torch.randn(64, 64), torch.randint(0, 64, (64,))
    return {
        "100 x Linear(64, 64)": lambda: nn.Sequential(*[nn.Linear(64, 64) for _ in range(100)]),
        "recurrent 40-256-10": lambda: Recurrent(40, 256, 10),
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
    """Median seconds per call of each variant, over rounds that time every variant once, in a
    fresh random order (a fixed order lets a periodic neighbour favour one of them)."""
    times = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(3):
            fn()  # warm up: plans, workspaces, allocator
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - start) / repeat)
    return {name: statistics.median(values) for name, values in times.items()}


def dispatched_ops(fn) -> int:
    """Ops dispatched by one call of ``fn``, planned as on a GPU (views included)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from nwave_param._engine import plans

    class Count(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.count += 1
            return func(*args, **(kwargs or {}))

    with plans.planned_as("cuda"):
        fn()  # plans and buffers are made once
        with Count():
            fn()
    del torch
    return Count.count


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


# --- probes: each runs in a fresh process, with one intra-op thread, and prints one JSON line ---


def probe_recipe(name: str, rounds: int) -> dict:
    import copy

    import torch
    from torch import nn

    import nwave_param as nwp

    plain, x, y = build(name)
    settings = {
        "registered, h=0": (nwp.ChipSpec(), 0.0, False),
        "+ penalty": (nwp.ChipSpec(), 0.0, True),
        "h=1 + penalty": (nwp.ChipSpec(), 1.0, True),
        "h=1 + penalty, bits=5, mismatch=0.02": (nwp.ChipSpec(bits=5, mismatch=0.02), 1.0, True),
    }

    def step_of(model, reg=None, penalty=False):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            if reg is None:
                loss = nn.functional.cross_entropy(model(x), y)
            else:
                with reg.cached():
                    loss = nn.functional.cross_entropy(model(x), y)
                    if penalty:
                        loss = loss + reg.penalty()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        return step

    variants, models = {"plain": step_of(plain)}, {}
    for variant, (spec, hardness, penalty) in settings.items():
        models[variant] = copy.deepcopy(plain)
        reg = nwp.register(models[variant], spec).harden(hardness)
        variants[variant] = step_of(models[variant], reg, penalty)
    times = interleaved(variants, rounds, 2)
    row = {"model": name, "plain_step_ms": times["plain"] * 1e3}
    row.update({variant: times[variant] / times["plain"] for variant in settings})
    hardened = models["h=1 + penalty"]
    reg = nwp.registry_of(hardened)

    def hardened_forward():  # every weight, as the model reads them
        with reg.cached():
            for module in hardened.modules():
                if isinstance(module, nn.Linear):
                    _ = module.weight  # reading it computes it

    row["hardened_forward_ops"] = dispatched_ops(hardened_forward)
    return row


def probe_penalty(name: str, rounds: int) -> dict:
    import torch

    import nwave_param as nwp

    model = build(name)
    reg = nwp.register(model)
    weights = reg.latent_weights()

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
    row["penalty_ops"] = dispatched_ops(penalty)
    return row


def probe_first_call(name: str, started: float) -> dict:
    import torch

    import nwave_param as nwp

    register = nwp.register  # the package imports its modules at their first use: counted with the import, as before
    imported = time.perf_counter()
    model = build(name)
    begin = time.perf_counter()
    register(model).penalty().backward()
    end = time.perf_counter()
    del torch
    return {"model": name, "import_s": imported - started, "first_call_s": end - begin, "total_s": end - started}


def probe_lifecycle(name: str, rounds: int) -> dict:
    import torch

    import nwave_param as nwp

    reg = nwp.register(build(name))
    weights = reg.latent_weights()

    def floor():
        for w in weights:
            w.grad = None
        torch.stack(torch._foreach_norm(weights, 1)).sum().backward()

    times = interleaved({"floor": floor, "report": reg.report, "project_": reg.project_}, rounds, 1)
    return {"model": name, "report_vs_floor": times["report"] / times["floor"], "project_vs_floor": times["project_"] / times["floor"]}


PROBES = {"recipe": probe_recipe, "penalty": probe_penalty, "lifecycle": probe_lifecycle}


def run_probe(*args: str) -> dict:
    env = {**os.environ, "NWAVE_BENCH_STARTED": repr(time.perf_counter()), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--probe", *args], capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"probe {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spin() -> None:
    while True:
        pass


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: the smallest models, few rounds")
    parser.add_argument("--load", type=int, default=0, metavar="N", help="keep N busy processes running meanwhile")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--probe", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        import torch

        torch.set_num_threads(1)
        kind, *rest = args.probe
        if kind == "first-call":
            result = probe_first_call(rest[0], float(os.environ["NWAVE_BENCH_STARTED"]))
        else:
            result = PROBES[kind](rest[0], int(rest[1]))
        print(json.dumps(result))
        return

    busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
    for process in busy:
        process.start()
    try:
        rounds = 3 if args.quick else 41
        recipes = RECIPE_MODELS[:1] if args.quick else RECIPE_MODELS
        penalties = PENALTY_MODELS[1:2] if args.quick else PENALTY_MODELS
        results = {
            "machine": {**machine(), "threads": 1, "load": args.load},
            "recipe": [run_probe("recipe", name, str(rounds)) for name in recipes],
            "penalty": [run_probe("penalty", name, str(rounds)) for name in penalties],
            "first_call": run_probe("first-call", penalties[-1]),
            "lifecycle": run_probe("lifecycle", penalties[-1], "3" if args.quick else "7"),
        }
    finally:
        for process in busy:
            process.terminate()
    m = results["machine"]
    print(f"machine: {m['cpu']} ({m['simd']}), {m['cores']} cores, one intra-op thread, torch {m['torch']}, load {m['load']}\n")
    print("1. one training step of the recipe, against the same step unregistered (lower is better)")
    print(table(results["recipe"], ["model", "plain_step_ms", *VARIANTS, "hardened_forward_ops"]))
    print("\n2. reg.penalty() forward + backward (penalty_vs_floor: lower is better; the others: higher is better)")
    columns = ["model", "floor_ms", "penalty_ms", "penalty_vs_floor", "naive_vs_penalty"]
    if any("rockpool_vs_penalty" in r for r in results["penalty"]):
        columns.append("rockpool_vs_penalty")
    print(table(results["penalty"], [*columns, "penalty_ops"]))
    f = results["first_call"]
    print(f"\n3. first call in a fresh process ({f['model']}): {f['first_call_s']:.2f} s (import {f['import_s']:.2f} s)")
    lc = results["lifecycle"]
    print(f"\n4. {lc['model']}, against the floor: report() {lc['report_vs_floor']:.2f}x, project_() {lc['project_vs_floor']:.2f}x")
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
