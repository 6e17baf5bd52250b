"""Hypothesis runs derandomized: CI sees the same examples every time (a failure reproduces)."""

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")
