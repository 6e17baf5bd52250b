"""The chip's design rules a network may break, each check naming the rule and the population:
cycles through populations, weights in series and convolutions the chip holds unrolled (notes),
the front end's one-to-one input, and the neurons (one threshold, the chip's reset, no
adaptation)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nwave_param.core.neurons import is_spiking
from nwave_param.core.trace import INPUT, Trace
from nwave_param.errors import one_line
from nwave_param.placement.graph import Graph
from nwave_param.spec import ChipSpec

__all__ = ["convolution_notes", "cycles", "input_problems", "neuron_problems", "series_notes"]


def _reach(follows: dict[int, set[int]], start: int) -> set[int]:
    reach, stack = set(), list(follows[start])
    while stack:
        q = stack.pop()
        if q not in reach:
            reach.add(q)
            stack.extend(follows[q])
    return reach


def cycles(graph: Graph, names: list[str]) -> list[str]:
    """A note for each cycle through several populations (A to B to A): the vendor's docs do not
    say whether the chip allows one."""
    follows = {p: {q for _, q in graph.through_synapses(("population", p))[0] if q != p} for p in range(len(names))}
    reaches = {p: _reach(follows, p) for p in follows}
    notes, seen = [], set()
    for p in follows:
        loop = frozenset({p} | {q for q in reaches[p] if p in reaches[q]})
        if len(loop) > 1 and loop not in seen:
            seen.add(loop)
            members = ", ".join(one_line(names[q]) for q in sorted(loop))
            notes.append(
                f"{members} feed each other in a cycle (not a recurrent population's own connections): "
                "the vendor's docs do not say whether the chip allows it"
            )
    return notes


def input_problems(traced: Trace, graph: Graph, spec: ChipSpec, names: list[str], front: set[int], sizes: dict) -> list[str]:
    problems = []
    if traced.channels > spec.inputs:
        problems.append(f"the example has {traced.channels} input channels per time step; the chip's front end has {spec.inputs}")
    if not front:
        return problems + ["the input reaches no population: the chip's input channels feed the first layer (the front end)"]
    if len(front) > 1:
        listed = ", ".join(one_line(names[p]) for p in sorted(front))
        problems.append(f"the input reaches several populations ({listed}); the chip's input channels feed one first layer, one-to-one")
    for p in sorted(front):
        if sizes[p] is not None and sizes[p] > spec.inputs:
            problems.append(
                f"{one_line(names[p])}: the front end has {sizes[p]} neurons; the chip feeds its {spec.inputs} input channels "
                "one-to-one to the first layer, so it holds at most that many"
            )
    for p in sorted(front):
        fans = traced.fans.get(p)
        before = sorted(graph.synapses_between(INPUT, ("population", p)))
        wheres = list(dict.fromkeys(one_line(traced.all_uses[u].where) for u in before))  # one per op, not per time step
        through = ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")
        via = f" (through {through})" if through else ""
        if fans is None:
            said = "the trace cannot follow which input channels reach which of its neurons"
        elif fans[0] > 1 or fans[1] > 1:
            said = f"one of its neurons gets up to {fans[0]} input channels, and one channel reaches up to {fans[1]} of its neurons"
        else:
            continue
        problems.append(
            f"{one_line(names[p])}: {said}{via}; the chip's input channels reach the front end one-to-one, with no fan-in or "
            "fan-out (nwp.FrontEnd, a gain per channel, or a diagonal matrix)"
        )
    return problems


def series_notes(traced: Trace) -> list[str]:
    """A note for each weight that reads another weight's current, with no neurons between: the
    chip holds one synapse matrix from a population to the next, and nwave_param constrains each
    weight, not what they compute together (a note, not a problem: a fixed scalar gain before a
    weight, say, leaves it as mappable as the weight)."""
    notes, seen = [], set()
    for use in traced.all_uses:
        for token in sorted(use.reads, key=str):
            if use.parameter and token != INPUT and token[0] == "current" and traced.all_uses[token[1]].parameter:
                before = traced.all_uses[token[1]]
                if (before.name, use.name) not in seen:
                    seen.add((before.name, use.name))
                    pair = (
                        f"{one_line(use.name)} is applied twice in series" if before.name == use.name
                        else f"{one_line(before.name)} and {one_line(use.name)} are two weights in series"
                    )
                    notes.append(
                        f"{one_line(use.where)} reads the current of {one_line(before.where)}: {pair} with no neurons between; "
                        "the chip holds one synapse matrix from a population to the next, and nwave_param constrains each weight, "
                        "not what they compute together: make them one weight, or put neurons between"
                    )
    return notes


def convolution_notes(traced: Trace, spec: ChipSpec, names: list[str], sizes: dict) -> list[str]:
    """A note for each population that holds a convolution's whole output map, where the kernel
    carries one input to several of its positions: the chip holds the layer unrolled, and
    nwave_param constrains the weights from one input at one kernel offset to share a sign in
    blocks of output channels.  Laid out channels-last, each position's channels padded to whole
    blocks of ``group_size``, each of the population's blocks holds one offset; laid out channel
    by channel, a block may hold one input's weights at several offsets, which nothing
    constrains.  A note, not a problem: the layout is the deployer's choice, which nwave_param
    cannot see.  A population holding part of the map (cropped, or a convolution over time read a
    step at a time) or several maps side by side is not read."""
    notes, size, seen = [], spec.group_size, set()
    for p, n in sizes.items():
        currents = sorted(t[1] for t in traced.feeds.get(p, frozenset()) if t != INPUT and t[0] == "current")
        for use in (traced.all_uses[index] for index in currents):
            reach, positions = use.unrolled
            key = (p, use.name, use.where, use.unrolled)  # a weight stepped over time once; two weights made in the forward twice
            if use.op not in ("conv", "conv_transpose") or reach < 2 or use.rows is None or key in seen:
                continue
            channels = use.rows * (use.groups if use.op == "conv_transpose" else 1)
            if n != channels * positions:  # the population holds part of the map, or more than it
                continue
            seen.add(key)
            padded = -(-channels // size) * size  # whole blocks, as the placement counts them
            notes.append(
                f"{one_line(names[p])}: {one_line(use.where)} applies {one_line(use.name)} at {positions} positions, one input "
                f"reaching up to {reach} of them through as many kernel offsets, and nwave_param makes the weights of one offset "
                f"share a sign in blocks of {size} output channels: on the chip, laying these neurons out channels-last, each "
                f"position's channels padded to whole blocks of {size}, keeps every block at one offset"
                + (f" ({padded} neurons a position, {padded * positions} in all, against the {n} placed here)" * (padded != channels))
                + "; laid out channel by channel, a block may mix offsets"
            )
    return notes


def neuron_problems(traced: Trace, spec: ChipSpec, names: list[str], candidates: dict[str, nn.Module], notes: list[str]) -> list[str]:
    """One threshold for all populations, none learned or adapting, and the reset of
    ``spec.reset``; a module named in ``neurons`` is checked by the snnTorch or Norse neurons
    inside it, where it says nothing itself."""
    problems = []
    thresholds: dict[float, list[str]] = {}
    for p, path in enumerate(traced.populations):
        module = candidates[path]
        readings = [(module, _neuron(module))]
        if readings[0][1] == (None, False, None):  # it says nothing itself: the snnTorch or Norse neurons inside it
            readings = [(m, _neuron(m)) for m in module.modules() if m is not module and is_spiking(m)] or readings
        for neuron, (threshold, learned, reset) in readings:
            name = one_line(names[p])
            if threshold is None:
                notes.append(f"{name}: its threshold cannot be read (an snnTorch or Norse neuron, or a 'threshold' attribute, says it)")
            elif isinstance(threshold, str):
                problems.append(f"{name}: {threshold}; the chip has one threshold for the whole network")
            else:
                thresholds.setdefault(_as_float32(threshold), []).append(name)
            if learned:
                problems.append(f"{name}: its threshold is learned (a Parameter); the chip's threshold is fixed, the same for every neuron")
            if _adapts(neuron):
                problems.append(
                    f"{name}: its neurons adapt ({type(neuron).__name__}); the chip's neurons have one fixed threshold and no adaptation"
                )
            if reset is None:
                notes.append(f"{name}: its reset cannot be read (an snnTorch or Norse neuron, or a 'reset_mechanism' attribute, says it)")
            elif spec.reset is not None and reset != spec.reset:
                problems.append(
                    f"{name}: it {_RESETS.get(reset, f'resets {reset}')}; the chip {_RESETS[spec.reset]} (ChipSpec.reset={spec.reset!r})"
                )
    if len(_one_threshold(thresholds)) > 1:
        listed = "; ".join(f"{value:.9g} for {', '.join(dict.fromkeys(who))}" for value, who in sorted(thresholds.items()))
        problems.append(f"the populations have different thresholds ({listed}); the chip has one fixed threshold for the whole network")
    return problems


_RESETS = {"subtract": "resets by subtracting the threshold", "zero": "resets to zero", "none": "never resets"}


def _one_threshold(thresholds: dict[float, list[str]]) -> list[float]:
    """The distinct thresholds, values within bfloat16's precision (2**-8, relative) being one: a
    threshold held in a bfloat16 model is the same threshold."""
    distinct: list[float] = []
    for value in sorted(thresholds):
        if not distinct or abs(value - distinct[-1]) > 2**-8 * max(abs(value), abs(distinct[-1])):
            distinct.append(value)
    return distinct


def _as_float32(value: float) -> float:
    """A threshold as the chip's float32 holds it: 0.1 written in Python and 0.1 in a float32
    tensor are one threshold."""
    return float(torch.tensor(value, dtype=torch.float32))


def _adapts(module: nn.Module) -> bool:
    """Whether a neuron adapts to its spikes (its threshold, or a current): Norse's LSNN and AdEx neurons."""
    parameters = getattr(module, "p", None)
    return any(hasattr(parameters, attribute) for attribute in ("tau_adapt_inv", "adaptation_current", "adaptation_spike"))


def _neuron(module: nn.Module) -> tuple[float | str | None, bool, str | None]:
    """``(threshold, learned, reset)`` of a neuron module: snnTorch's (``threshold``,
    ``reset_mechanism``), Norse's (``p.v_th``, its reset), or a module's own ``threshold`` and
    ``reset_mechanism`` attributes; None where it cannot be read; the threshold is a sentence when
    its neurons' thresholds differ."""
    parameters = getattr(module, "p", None)
    value = getattr(module, "threshold", None)
    if value is None and parameters is not None:
        value = getattr(parameters, "v_th", None)
    learned = isinstance(value, nn.Parameter) and value.requires_grad
    threshold: float | str | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        threshold = float(value)
    elif isinstance(value, Tensor) and value.numel():
        values = value.detach().reshape(-1).unique()
        threshold = float(values[0]) if values.numel() == 1 else f"its neurons have {values.numel()} different thresholds"
    reset = getattr(module, "reset_mechanism", None)
    if not isinstance(reset, str) and parameters is not None:
        reset = _norse_reset(parameters)
    return threshold, learned, reset if isinstance(reset, str) else None


def _norse_reset(parameters: object) -> str | None:
    """Norse's reset: to ``v_reset`` (zero when it is 0), or its box neurons' ``reset_method``."""
    method = getattr(parameters, "reset_method", None)
    if method is not None:
        return {"reset_subtract": "subtract", "reset_value": "zero"}.get(getattr(method, "__name__", ""))
    v_reset = getattr(parameters, "v_reset", None)
    if v_reset is None:
        return None
    return "zero" if float(torch.as_tensor(v_reset).abs().max()) == 0 else "to v_reset"
