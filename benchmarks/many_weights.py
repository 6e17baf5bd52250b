"""``nwave-param check`` of many tiny weights, against ``torch.load`` of the same file.

    python benchmarks/many_weights.py               # the issue's file: 100,000 weights of shape (1, 1), 5 rounds
    python benchmarks/many_weights.py --quick       # 10,000 weights, 2 rounds (a smoke run)
    python benchmarks/many_weights.py --json out.json

The file is a state_dict of ``fc<i>.weight`` tensors of shape (1, 1), views of one storage (9.3 MiB
on disk for 100,000 of them, 400 kB of tensors), checked under ``--max-bytes 20M``.  Each round runs,
in a fresh random order, one fresh process per variant, each with one intra-op thread and with
torch and nwave_param's modules imported before its clock starts (so both peaks hold the same
modules; importing them takes 2 s, mostly torch._dynamo, once per process, whatever the file):

* ``torch.load``: ``torch.load(path, weights_only=True)``;
* ``check``: ``nwave_param.checkpoints.cli.main(["check", path, "--max-bytes", "20M"])``, its text to /dev/null;
* ``check --json``: the same with ``--json``.

Each variant's time and peak resident size (``ru_maxrss``) are the medians over the rounds; the
figures that matter are the ratios to ``torch.load`` in the same run.  The machine is named at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

from run import machine, table

MAX_BYTES = "20M"
PROBE = rf"""
import json, os, resource, sys, time
import torch
import nwave_param.checkpoints.commands  # what the command imports after its signal handler: imported before the clock, in both
from nwave_param.checkpoints.cli import main

torch.set_num_threads(1)
path, variant = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if variant == "torch.load":
    torch.load(path, weights_only=True)
    code = None
else:
    sys.stdout = open(os.devnull, "w")
    code = main(["check", path, "--max-bytes", "{MAX_BYTES}", *(["--json"] if variant == "check --json" else [])])
seconds = time.perf_counter() - start
sys.stdout = sys.__stdout__
print(json.dumps({{"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "code": code}}))
"""
VARIANTS = ("torch.load", "check", "check --json")
ROW = ("seconds", "peak_mib", "time_vs_load", "peak_vs_load")


def make_file(path: str, count: int) -> None:
    import torch

    torch.manual_seed(0)
    storage = torch.randn(count, 1)
    torch.save({f"fc{i}.weight": storage[i : i + 1] for i in range(count)}, path)


def probe(path: str, variant: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, path, variant], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if result.returncode != 0:
        raise SystemExit(f"{variant} failed: {result.stderr.strip()}")
    data = json.loads(result.stdout)
    if variant != "torch.load" and data["code"] not in (0, 1):
        raise SystemExit(f"{variant} exited {data['code']}")
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 weights, 2 rounds")
    parser.add_argument("--weights", type=int, help="how many (1, 1) weights (default 100,000)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    count = args.weights or (10_000 if args.quick else 100_000)
    rounds = args.rounds or (2 if args.quick else 5)
    measured: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "many.pt")
        make_file(path, count)
        size = os.path.getsize(path)
        order, shuffle = list(VARIANTS), random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for variant in order:
                measured[variant].append(probe(path, variant))
    medians = {
        variant: {key: statistics.median(run[key] for run in runs) for key in ("seconds", "peak_mib")}
        for variant, runs in measured.items()
    }
    base = medians["torch.load"]
    results = {
        "machine": {**machine(), "threads": 1},
        "file": {"weights": count, "shape": [1, 1], "mib": round(size / 2**20, 1), "max_bytes": MAX_BYTES, "rounds": rounds},
        "variants": {
            variant: {
                "seconds": round(m["seconds"], 3),
                "peak_mib": round(m["peak_mib"], 1),
                "time_vs_load": round(m["seconds"] / base["seconds"], 2),
                "peak_vs_load": round(m["peak_mib"] / base["peak_mib"], 2),
            }
            for variant, m in medians.items()
        },
    }
    info = results["machine"]
    print(f"{info['cpu']}, {info['simd']}, torch {info['torch']}, 1 thread")
    print(f"{count:,} weights of shape (1, 1), {results['file']['mib']} MiB, --max-bytes {MAX_BYTES}, medians of {rounds} rounds")
    print(table([{"variant": variant, **row} for variant, row in results["variants"].items()], ["variant", *ROW]))
    if args.json:
        with open(args.json, "w") as stream:
            json.dump(results, stream, indent=2)


if __name__ == "__main__":
    main()
