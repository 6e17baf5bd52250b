"""The recipe over seeds: the demo's hardened run on the chip against the same seed's baseline.

    python benchmarks/recipe.py [--seeds 0 1 2 3 4] [--configs ...] [--workers 2] [--validation [--folds 5]]
                                [--out recipe.jsonl]

Each configuration trains the demo's network (``nwave_param.demo``) from seeds 0-4: the baseline
(the task loss alone, the same learning-rate schedule) and the hardened run (the whole
:class:`nwave_param.Schedule`), each on one intra-op thread, in ``--workers`` processes.  The gap
of a seed is the hardened run's test accuracy on the chip (projected; the mean over the demo's
chip instances where the spec has a grid or mismatch) minus the baseline's test accuracy as
trained.  ``--validation`` evaluates on the demo's validation split of the training set instead
(what the rule is chosen on); with ``--folds K`` each of its first K folds is held out in turn
(``demo.validation_split``: five folds partition the training set) and a seed's gap is the mean
over folds, so that every training example validates once.  Prints one markdown table per
configuration (a row per seed, the mean gap, the worst and the gaps' spread), naming the CPU,
as docs/training-on-the-chip.md holds them; ``--out`` keeps every run as a JSON line, and a run
already there is not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from run import machine

CONFIGS = {  # name -> (task, chip, bits, mismatch)
    "H1v2, vowels": ("vowels", "h1v2", None, 0.0),
    "H1v2 vowels, 5 bits and mismatch 0.02": ("vowels", "h1v2", 5, 0.02),
    "H1v1, vowels": ("vowels", "h1v1", None, 0.0),
    "H1v2, digits": ("digits", "h1v2", None, 0.0),
    "H1v1, digits": ("digits", "h1v1", None, 0.0),
}


def job(task: str, chip: str, bits: int | None, mismatch: float, seed: int, run: str, validation: bool, fold: int = 0) -> dict:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from nwave_param import demo

    spec = demo.CHIP_SPECS[chip].replace(bits=bits, mismatch=mismatch)
    start = time.perf_counter()
    outcomes, _ = demo.run(None, spec, task, seed, runs=(run,), validation=validation, fold=fold)
    outcome = outcomes[run].to_dict()
    return dict(task=task, chip=chip, bits=bits, mismatch=mismatch, seed=seed, run=run, validation=validation, fold=fold,
                seconds=round(time.perf_counter() - start, 1), **outcome)


def key(record: dict) -> tuple:
    return (*(record[k] for k in ("task", "chip", "bits", "mismatch", "seed", "run", "validation")), record.get("fold", 0))


def runs_of(config: tuple, seed: int, validation: bool, fold: int) -> tuple[tuple, tuple]:
    """The keys (as :func:`key` reads a record) of one seed's two runs on one fold: the baseline,
    whose spec's grid and mismatch are off at hardness 0, and the hardened run on the chip."""
    task, chip, bits, mismatch = config
    return (task, chip, None, 0.0, seed, "baseline", validation, fold), (task, chip, bits, mismatch, seed, "hardened", validation, fold)


def rows_of(done: dict, config: tuple, seeds: list[int], folds: int, validation: bool) -> list[tuple[int, float, float, float]]:
    """``(seed, baseline float, hardened on the chip, gap)`` per seed, in percent, each the mean
    over the folds: the hardened run's chip accuracy is its mean over the demo's chips where
    the spec has a grid or mismatch, else its projected accuracy."""
    rows = []
    for seed in seeds:
        pairs = [runs_of(config, seed, validation, fold) for fold in range(folds)]
        bases = [done[baseline]["float_accuracy"] for baseline, _ in pairs]
        hards = [done[hardened] for _, hardened in pairs]
        base = statistics.mean(bases)
        on_chip = statistics.mean(hard.get("chip_accuracy_mean", hard["projected_accuracy"]) for hard in hards)
        rows.append((seed, 100 * base, 100 * on_chip, 100 * (on_chip - base)))
    return rows


def table(name: str, rows: list[tuple[int, float, float, float]]) -> str:
    """One configuration's markdown table, as docs/training-on-the-chip.md holds them: a row per
    seed, then the mean gap, the worst and the gaps' spread (their standard deviation, with two
    seeds or more), which says how far above a bound for every seed the mean must sit."""
    bits, mismatch = CONFIGS[name][2:]
    chip_column = "hardened, mean of the demo's chips" if bits is not None or mismatch else "hardened on the chip"
    gaps = [gap for *_, gap in rows]
    lines = [f"**{name}**", "", f"| seed | baseline float | {chip_column} | gap |", "|---|---|---|---|"]
    lines += [f"| {seed} | {base:.1f} | {hard:.1f} | {gap:+.1f} |" for seed, base, hard, gap in rows]
    lines += [f"| mean gap | | | {statistics.mean(gaps):+.2f} |", f"| worst gap | | | {min(gaps):+.1f} |"]
    if len(gaps) > 1:
        lines.append(f"| spread (sd) | | | {statistics.stdev(gaps):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--validation", action="store_true")
    parser.add_argument("--folds", type=int, default=1, choices=range(1, 6), help="with --validation: hold out folds 0..K-1 in turn")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.folds > 1 and not args.validation:
        parser.error("--folds needs --validation (the test set has no folds)")
    done = {}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            done = {key(r): r for r in map(json.loads, f)}
    folds = range(args.folds)
    wanted = []
    for name in args.configs:
        for seed in args.seeds:
            for fold in folds:
                wanted.extend(runs_of(CONFIGS[name], seed, args.validation, fold))
    todo = list(dict.fromkeys(w for w in wanted if w not in done))
    with ProcessPoolExecutor(args.workers) as pool:
        for record in pool.map(job, *zip(*todo)) if todo else ():
            done[key(record)] = record
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    evaluated = "validation split" + (f", the mean over {args.folds} folds" if args.folds > 1 else "") if args.validation else "test set"
    found = machine()
    print(f"\nMeasured on {found['cpu']} ({found['simd']}, {found['cores']} cores), torch {found['torch']}, "
          f"one intra-op thread per run, {args.workers} runs at once; "
          f"{evaluated}.\n")
    for name in args.configs:
        print(table(name, rows_of(done, CONFIGS[name], args.seeds, args.folds, args.validation)))


if __name__ == "__main__":
    main()
