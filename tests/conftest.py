"""Hypothesis runs derandomized: CI sees the same examples every time (a failure reproduces).

The tests' tensors are tiny: one intra-op thread computes them as fast as two, and does not slow
to a crawl when other processes share the CPU (spinning worker threads would).  The examples and
command lines the tests start in subprocesses inherit it through ``OMP_NUM_THREADS``.

Each test starts with dynamo's caches empty.  A registered module has a class of its own (as
``parametrize`` gives every parametrized module), so every compiled model recompiles
``Module.__call__``'s wrapper; without a reset, the ninth compiled model of the session hits
dynamo's recompile limit, and which test that is depends on the order the tests ran in.

The command line's tests (test_cli*.py, test_files.py, test_outputs.py, ...) share two checkpoints,
the fixtures ``plain`` and ``mixed``, made with the helpers of ``tests/commandline.py``.
"""

import os
import sys

import pytest
import torch
import torch._dynamo
from commandline import MIXED_SOURCE, make_model
from hypothesis import settings

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()  # about 10 microseconds when nothing was compiled


@pytest.fixture
def plain(tmp_path):
    """Linear and LSTM weights only: every layout is certain without --model."""
    path = tmp_path / "plain.pt"
    torch.save(make_model().state_dict(), path)
    return path


@pytest.fixture
def mixed(tmp_path, monkeypatch):
    """The module factory ``mixed_mod:build``, importable from the working directory."""
    (tmp_path / "mixed_mod.py").write_text(MIXED_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("mixed_mod", None)
    import mixed_mod

    return mixed_mod
