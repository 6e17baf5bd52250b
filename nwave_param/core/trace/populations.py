"""Populations over time: a neuron module that restarts its state per input size is one layer over time, its populations merged."""

from __future__ import annotations

import dataclasses

from nwave_param.core.trace.records import INPUT, Call, Trace
from nwave_param.errors import one_line

__all__ = ["layers_over_time"]


def layers_over_time(traced: Trace) -> Trace:
    """One layer whose state restarts at every call (an snnTorch neuron that resets its state
    when the size of its input changes, applied to two layers at each time step) makes a
    population per call: those of one module, one size and fed by the same weights and
    populations are one layer over time, merged into the first, with a note."""
    alias: dict[int, int] = {}
    seen: dict[tuple, int] = {}

    def source(token: tuple) -> tuple | None:
        if token == INPUT:
            return token
        kind, what = token
        if kind == "current":
            return ("weight", traced.all_uses[what].name)
        return None if kind == "own" else ("population", alias.get(what, what))

    for p, path in enumerate(traced.populations):
        feeds = frozenset(filter(None, map(source, traced.feeds.get(p, ())))) - {("population", p)}
        key = (path, traced.neurons(p), feeds)
        if key in seen:
            alias[p] = seen[key]
        else:
            seen[key] = p
    if not alias:
        return traced
    kept = [p for p in range(len(traced.populations)) if p not in alias]
    number = {p: kept.index(alias.get(p, p)) for p in range(len(traced.populations))}

    def renumbered(tokens: frozenset) -> frozenset:
        return frozenset(t if t == INPUT or t[0] == "current" else (t[0], number[t[1]]) for t in tokens)

    merged = Trace(channels=traced.channels, notes=list(traced.notes))
    merged.populations = [traced.populations[p] for p in kept]
    merged.modules = [traced.modules[p] for p in kept]
    merged.calls = [Call(number[c.population], c.neurons, c.batch_found) for c in traced.calls]
    for p, reached in traced.feeds.items():
        merged.feeds[number[p]] = merged.feeds.get(number[p], frozenset()) | renumbered(reached)
    for p, fans in traced.fans.items():
        merged.fans.setdefault(number[p], fans)
    merged.all_uses = [dataclasses.replace(use, reads=renumbered(use.reads)) for use in traced.all_uses]
    for use in merged.all_uses:
        if use.parameter:
            merged.uses.setdefault(use.name, []).append(use)
    for path in dict.fromkeys(traced.populations[p] for p in alias):
        merged.notes.append(
            f"{one_line(path)}: its calls each start their state afresh; those of one size fed by the same weights are read "
            "as one layer over time"
        )
    return merged
