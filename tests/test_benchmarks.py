"""The benchmark harness runs end to end (a smoke run: nothing here asserts a time)."""

import json
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).parents[1] / "benchmarks" / "run.py"


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(HARNESS), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [row["model"] for row in data["penalty"]] == [
        "100 x Linear(64, 64)",
        "recurrent 40-256-10",
        "6 x Linear(512, 512)",
        "4 x Linear(2048, 2048)",
    ]
    for row in data["penalty"]:
        assert row["penalty_vs_floor"] > 0 and row["naive_vs_penalty"] > 0
    assert [row["batch"] for row in data["training_overhead"]] == [32, 1]
    assert data["first_call"]["first_call_s"] > 0
    assert data["memory"]["penalty_extra_mb"] > 0 and data["memory"]["floor_extra_mb"] > 0
    assert set(data["lifecycle"]) == {"report_vs_floor", "project_vs_floor"}
    assert "penalty_vs_floor" in result.stdout and "training-step overhead" in result.stdout
