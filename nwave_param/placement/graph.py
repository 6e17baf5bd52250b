"""The network as a graph, read from the trace: who feeds whom (the input, populations, and each
use of a synapse apart)."""

from __future__ import annotations

from nwave_param.core.trace import INPUT, Trace

__all__ = ["Graph", "node"]


class Graph:
    """Who feeds whom: the input, populations and synapses (each use of a weight apart, so that
    one weight used at two places joins no populations); a synapse's current feeds a population
    or another synapse."""

    def __init__(self, traced: Trace) -> None:
        self.edges: dict[tuple, set[tuple]] = {}
        for use in traced.all_uses:
            for token in use.reads:
                self.add(node(token), ("use", use.index))
        for population, reached in traced.feeds.items():
            for token in reached:
                source = node(token)
                if source != ("population", population):
                    self.add(source, ("population", population))

    def add(self, source: tuple, target: tuple) -> None:
        self.edges.setdefault(source, set()).add(target)

    def through_synapses(self, source: tuple) -> tuple[set[tuple], set[int]]:
        """The populations ``source`` reaches through synapses alone (or directly), and the
        synapses (their :attr:`Use.index`) on the way."""
        reached, uses, stack, seen = set(), set(), [source], {source}
        while stack:
            for target in self.edges.get(stack.pop(), ()):
                if target[0] == "population":
                    reached.add(target)
                elif target not in seen:
                    seen.add(target)
                    uses.add(target[1])
                    stack.append(target)
        return reached, uses

    def front(self) -> set[int]:
        """The populations the input reaches first (through synapses alone, or directly): the front end."""
        return {p for _, p in self.through_synapses(INPUT)[0]}

    def synapses_between(self, source: tuple, target: tuple) -> set[int]:
        """The synapses on some synapses-only path from ``source`` to ``target``."""
        _, after = self.through_synapses(source)
        return {u for u in after if target in self.through_synapses(("use", u))[0]}


def node(token: tuple) -> tuple:
    if token == INPUT:
        return INPUT
    kind, what = token
    return ("use", what) if kind == "current" else ("population", what)  # spikes, state, or its own state
