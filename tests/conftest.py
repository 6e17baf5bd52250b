"""Hypothesis runs derandomized: CI sees the same examples every time (a failure reproduces).

The tests' tensors are tiny: one intra-op thread computes them as fast as two, and does not slow
to a crawl when other processes share the CPU (spinning worker threads would).  The examples and
command lines the tests start in subprocesses inherit it through ``OMP_NUM_THREADS``.
"""

import os

import torch
from hypothesis import settings

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")
