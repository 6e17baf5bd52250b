"""Hypothesis runs derandomized: CI sees the same examples every time (a failure reproduces).

The tests' tensors are tiny: one intra-op thread computes them as fast as two, and does not slow
to a crawl when other processes share the CPU (spinning worker threads would).  The examples and
command lines the tests start in subprocesses inherit it through ``OMP_NUM_THREADS``.

Each test starts with dynamo's caches empty.  A registered module has a class of its own (as
``parametrize`` gives every parametrized module), so every compiled model recompiles
``Module.__call__``'s wrapper; without a reset, the ninth compiled model of the session hits
dynamo's recompile limit, and which test that is depends on the order the tests ran in.
"""

import os

import pytest
import torch
import torch._dynamo
from hypothesis import settings

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def fresh_compiler():
    torch._dynamo.reset()  # about 10 microseconds when nothing was compiled
