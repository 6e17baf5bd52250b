"""The benchmark harness runs end to end and writes the JSON it promises (nothing here asserts a time)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
