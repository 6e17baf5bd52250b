"""The benchmark harness runs end to end and writes the JSON it promises (nothing here asserts a time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

HARNESS = Path(__file__).parents[1] / "benchmarks" / "run.py"


@pytest.mark.slow
def test_quick_run_writes_the_json_structure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(HARNESS), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "recipe", "penalty", "first_call", "lifecycle"}
    assert {"cpu", "simd", "cores", "threads", "torch", "load"} <= set(data["machine"]) and data["machine"]["threads"] == 1
    assert [row["model"] for row in data["recipe"]] == ["RNN 16-100-50"]
    for row in data["recipe"]:  # the step users run, against the same step unregistered
        assert {"plain_step_ms", "registered, h=0", "+ penalty", "h=1 + penalty", "h=1 + penalty, bits=5, mismatch=0.02"} <= set(row)
        assert isinstance(row["hardened_forward_ops"], int) and row["hardened_forward_ops"] > 0
    assert [row["model"] for row in data["penalty"]] == ["recurrent 40-256-10"]
    for row in data["penalty"]:
        assert {"floor_ms", "penalty_ms", "penalty_vs_floor", "naive_vs_penalty", "penalty_ops"} <= set(row)
    assert {"import_s", "first_call_s"} <= set(data["first_call"])
    assert set(data["lifecycle"]) == {"model", "report_vs_floor", "project_vs_floor"}
    assert data["machine"]["cpu"] in result.stdout and "penalty_vs_floor" in result.stdout and "h=1 + penalty" in result.stdout


@pytest.mark.slow
def test_many_weights_benchmark_runs_and_writes_its_ratios(tmp_path):
    out = tmp_path / "many.json"
    script = Path(__file__).parents[1] / "benchmarks" / "many_weights.py"
    result = subprocess.run(
        [sys.executable, str(script), "--weights", "500", "--rounds", "1", "--json", str(out)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["file"]["weights"] == 500 and data["machine"]["cpu"] in result.stdout
    assert set(data["variants"]) == {"torch.load", "check", "check --json"}
    assert data["variants"]["torch.load"]["time_vs_load"] == 1.0
    assert all({"seconds", "peak_mib", "time_vs_load", "peak_vs_load"} <= set(row) for row in data["variants"].values())


def _recipe_module():
    """benchmarks/recipe.py, imported as its directory's scripts import each other."""
    import importlib

    sys.path.insert(0, str(HARNESS.parent))
    try:
        return importlib.import_module("recipe")
    finally:
        sys.path.remove(str(HARNESS.parent))


@settings(max_examples=40, deadline=None)
@given(
    seeds=st.integers(1, 4),
    folds=st.integers(1, 3),
    grid=st.booleans(),
    accuracies=st.lists(st.floats(0, 1), min_size=24, max_size=24),
)
def test_recipe_tables_pool_each_seed_over_its_folds(seeds, folds, grid, accuracies):
    recipe = _recipe_module()
    name = "H1v2 vowels, 5 bits and mismatch 0.02" if grid else "H1v2, vowels"
    task, chip, bits, mismatch = recipe.CONFIGS[name]
    done, values = {}, iter(accuracies)
    for seed in range(seeds):
        for fold in range(folds):
            base, hard = next(values), next(values)
            done[(task, chip, None, 0.0, seed, "baseline", True, fold)] = {"float_accuracy": base}
            # with a grid and mismatch the chip's value is the mean over chips, not the projection
            outcome = {"chip_accuracy_mean": hard, "projected_accuracy": 2.0} if grid else {"projected_accuracy": hard}
            done[(task, chip, bits, mismatch, seed, "hardened", True, fold)] = outcome
    rows = recipe.rows_of(done, recipe.CONFIGS[name], list(range(seeds)), folds, True)
    pairs = iter(accuracies)
    assert [row[0] for row in rows] == list(range(seeds))
    for _, base, hard, gap in rows:
        drawn = [(next(pairs), next(pairs)) for _ in range(folds)]
        expected_base = 100 * sum(b for b, _ in drawn) / folds
        expected_hard = 100 * sum(h for _, h in drawn) / folds
        assert base == pytest.approx(expected_base) and hard == pytest.approx(expected_hard)
        assert gap == pytest.approx(expected_hard - expected_base, abs=1e-9)
    gaps = [row[3] for row in rows]
    text = recipe.table(name, rows)
    mean = sum(gaps) / len(gaps)
    assert f"| mean gap | | | {mean:+.2f} |" in text and f"| worst gap | | | {min(gaps):+.1f} |" in text
    if seeds > 1:
        spread = (sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)) ** 0.5
        assert f"| spread (sd) | | | {spread:.2f} |" in text
    else:
        assert "spread" not in text
    assert text.count("\n| ") == 1 + seeds + 2 + (seeds > 1)  # the header, a row per seed, mean, worst, spread
