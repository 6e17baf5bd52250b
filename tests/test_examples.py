"""The quick start runs as the README shows it: trained on the chip, projected, checked, saved, reloaded."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

QUICKSTART = Path(__file__).parents[1] / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_ends_mappable_within_two_points_of_the_unconstrained_net():
    result = subprocess.run([sys.executable, str(QUICKSTART)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr  # it asserts is_mappable(), and no change at projection or reload
    found = re.search(r"unconstrained ([\d.]+)%, on the chip ([\d.]+)% \(as trained ([\d.]+)%\)", result.stdout)
    unconstrained, chip, trained = map(float, found.groups())
    assert chip == trained and chip >= unconstrained - 2.0
