"""Placing a network on the chip's cores: does the network itself fit, and if not, which rule does
which population break.

What the network is comes from one traced forward (:mod:`nwave_param.trace`), not from the names
or types of its parts: which populations there are and their sizes, which weight feeds which
population, which population reaches its own input (recurrent), and which weights the input
passes through before the first population.

The chip, from the vendor's SDK documentation ("Chip overview", "Chip constraints"): H1v1 has 4
cores of 64 neurons, H1v2 cores of 50, 50 and 100 (:attr:`ChipSpec.cores
<nwave_param.ChipSpec.cores>`).  Feed-forward connections run within and between cores, so a
feed-forward population may be split across cores; recurrent connections are all-to-all but only
within one core, so a recurrent population sits whole in one core.  The front end's
``spec.inputs`` (16) filters each feed one neuron of the first layer: no fan-in, no fan-out.  One
firing threshold for the whole network, none learned; the reset of :attr:`ChipSpec.reset
<nwave_param.ChipSpec.reset>`.  The neurons of a core sit in blocks of ``spec.group_size`` (5),
whose weights from one input share a sign; where the blocks lie is not documented, and
nwave_param assumes they start at each core's first neuron.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .discovery import constraints
from .errors import one_line
from .neurons import is_spiking, neuron_modules, neuron_types
from .report import aligned
from .spec import H1V2, ChipSpec
from .trace import INPUT, Trace, trace

__all__ = ["Placement", "Population", "neuron_types", "place"]


@dataclass(frozen=True)
class Population:
    """One population of the network, and where it sits.

    ``cores`` maps a core's index to the neurons placed there, and ``offsets`` to where in that
    core the piece starts (a multiple of ``spec.group_size``); both empty when the network does
    not fit.  Pieces follow the population's order of neurons in the order of their cores.
    """

    name: str
    neurons: int
    recurrent: bool
    front_end: bool
    cores: dict[int, int] = field(default_factory=dict)
    offsets: dict[int, int] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return ("recurrent" if self.recurrent else "feed-forward") + (", front end" if self.front_end else "")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "neurons": self.neurons,
            "recurrent": self.recurrent,
            "front_end": self.front_end,
            "cores": {str(core): count for core, count in self.cores.items()},
            "offsets": {str(core): first for core, first in self.offsets.items()},
        }


@dataclass(frozen=True)
class Placement:
    """Where a network's populations sit on the chip, or the rules it breaks (``problems``, one
    line each), and what the check noticed without calling it a problem (``notes``)."""

    spec: ChipSpec
    populations: list[Population]
    problems: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        """JSON-ready (core indices as strings)."""
        return {
            "fits": self.fits,
            "spec": self.spec.to_dict(),
            "populations": [p.to_dict() for p in self.populations],
            "problems": list(self.problems),
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        cores = ", ".join(f"{n}" for n in self.spec.cores)
        header = f"cores ({cores}), {self.spec.inputs} inputs: " + ("fits" if self.fits else "does NOT fit")
        rows = [
            [one_line(p.name), str(p.neurons), p.kind, ", ".join(f"core {c}: {n} from {p.offsets.get(c, 0)}" for c, n in p.cores.items()) or "-"]
            for p in self.populations
        ]
        lines = [header, *aligned([["population", "neurons", "kind", "cores"], *rows], "lrll")] if rows else [header]
        return "\n".join(lines + [f"problem: {problem}" for problem in self.problems] + [f"note: {note}" for note in self.notes])


def place(
    model: nn.Module, example: Tensor, spec: ChipSpec | None = None, *, neurons: str | Iterable[str] = (), dims: str | None = None
) -> Placement:
    """Check that ``model``'s network can be placed on the chip's cores, and place it.

    Runs ``model(example)`` once under ``torch.no_grad()`` and reads the network from what it
    computes (:mod:`nwave_param.trace`); afterwards the model is exactly as before (parameters,
    buffers, training modes, submodules, hooks, torch's random state), with no gradients.

    Args:
        model: the network; snnTorch's and Norse's spiking neurons are found by themselves
            (:func:`neuron_types`), other neuron modules are named in ``neurons``.
        example: an input; its dims are read as ``dims`` says, by default time-first as snnTorch:
            a 3-D example is (time, batch, channels), a 2-D one (batch, channels).  The input is
            its channels per time step.
        spec: the chip; None takes the model's registration spec, else ``ChipSpec()``.
        neurons: dotted names of neuron modules (a neuron module inside one is part of it).
        dims: one letter per dim of the example, ``t`` time, ``b`` batch, others channels
            (``"btc"`` for batch-first sequences).

    Returns:
        A :class:`Placement`.  A *population* is one chain of membrane state of a neuron module
        (one module applied to two layers makes two); its size is every neuron of its spikes but
        the batch and time.  It is *recurrent* when its spikes reach its own input through
        weights, whichever module holds them.  The *front end* is the population the input
        reaches first.  Each broken rule is one line in ``problems``:

        * the example has at most ``spec.inputs`` channels, and the input reaches one population
          (the front end) of at most ``spec.inputs`` neurons, through weights with at most one
          non-zero entry per row and per column (no fan-in, no fan-out);
        * one threshold for all populations, none learned; the reset of ``spec.reset``;
        * every recurrent population sits whole in one core; feed-forward populations fill what
          is left, split between blocks of ``spec.group_size`` as needed; each population and each
          piece starts at a block of its core, so the padding counts against the capacity.

        A cycle through several populations (A to B to A) is a note, as is what cannot be read.

    Example::

        >>> import snntorch as snn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.front = snn.Leaky(beta=0.9, init_hidden=True)
        ...         self.fc = nn.Linear(16, 80)
        ...         self.hidden = snn.RLeaky(beta=0.9, linear_features=80, init_hidden=True)
        ...     def forward(self, x):
        ...         return self.hidden(self.fc(self.front(x)))
        >>> print(place(Net(), torch.rand(4, 16), H1V2))
        cores (50, 50, 100), 16 inputs: fits
        population  neurons  kind                     cores
        front            16  feed-forward, front end  core 2: 16 from 0
        hidden           80  recurrent                core 2: 80 from 20
        >>> place(Net(), torch.rand(4, 16), H1V2.replace(cores=(64, 64))).problems
        ['hidden: a recurrent population of 80 neurons sits whole in one core, and the largest core holds 64']

    Raises:
        TypeError: ``model`` is not a module, ``example`` not a tensor, ``spec`` not a ChipSpec.
        ValueError: a name in ``neurons`` is not a module of ``model``; ``dims`` does not read the
            example; the model holds a lazy module not yet initialized.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"place: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, Tensor):
        raise TypeError(f"place: example must be a tensor (the input of model(example)), got {type(example).__name__}")
    spec = _spec_of(model) if spec is None else spec
    if not isinstance(spec, ChipSpec):
        raise TypeError(f"place: spec must be a ChipSpec or None, got {type(spec).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its module, read eagerly
    named = (neurons,) if isinstance(neurons, str) else tuple(neurons)
    modules = dict(model.named_modules())
    for name in named:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"place: neurons names {one_line(repr(name))}, which is not a module of the model (names are dotted, as named_modules() gives them)")
    candidates = neuron_modules(model, set(named))
    traced = trace(model, example, candidates, dims)
    return _checked(traced, spec, candidates, named)


def _spec_of(model: nn.Module) -> ChipSpec:
    found = next(constraints(model), None)
    return found.constraint.settings.spec if found is not None else ChipSpec()


# --- the network, read from the trace ------------------------------------------------------------


def _population_names(traced: Trace) -> list[str]:
    """A population by its module's name; a module of several populations numbers them ``[k]``."""
    counts: dict[str, int] = {}
    for path in traced.populations:
        counts[path] = counts.get(path, 0) + 1
    seen: dict[str, int] = {}
    names = []
    for path in traced.populations:
        k = seen[path] = seen.get(path, -1) + 1
        names.append((path or "model") + (f"[{k}]" if counts[path] > 1 else ""))
    return names


class _Graph:
    """Who feeds whom: the input, populations and synapses (each use of a weight apart, so that
    one weight used at two places joins no populations); a synapse's current feeds a population
    or another synapse."""

    def __init__(self, traced: Trace) -> None:
        self.edges: dict[tuple, set[tuple]] = {}
        for use in traced.all_uses:
            for token in use.reads:
                self.add(_node(token), ("use", use.index))
        for population, reached in traced.feeds.items():
            for token in reached:
                source = _node(token)
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

    def synapses_between(self, source: tuple, target: tuple) -> set[int]:
        """The synapses on some synapses-only path from ``source`` to ``target``."""
        _, after = self.through_synapses(source)
        return {u for u in after if target in self.through_synapses(("use", u))[0]}


def _node(token: tuple) -> tuple:
    if token == INPUT:
        return INPUT
    kind, what = token
    return ("use", what) if kind == "current" else ("population", what)  # spikes, state, or its own state


def _checked(traced: Trace, spec: ChipSpec, candidates: dict[str, nn.Module], named: Sequence[str]) -> Placement:
    problems: list[str] = []
    notes = [one_line(note) for note in traced.notes]
    problems += [f"{one_line(name)} (named in neurons) never ran in model(example)" for name in named if name not in traced.populations]
    names = _population_names(traced)
    sizes = {p: traced.neurons(p) for p in range(len(names))}
    for name in (n for n in named if n in candidates):  # one inside another named one is part of it
        inner = [path for path, m in candidates[name].named_modules() if path and is_spiking(m)]
        if len(inner) > 1:
            problems.append(
                f"{one_line(name)} (named in neurons) holds several layers of neurons ({', '.join(map(one_line, inner))}): a population "
                "is one layer; name the layers inside it instead"
            )
    for p, size in sizes.items():
        if size is None:
            problems.append(f"{one_line(names[p])}: its output is not a tensor of spikes (nor a tuple starting with one): name a module that outputs spikes")
    for call in traced.calls:
        if call.neurons is not None and call.neurons != sizes[call.population]:
            notes.append(f"{one_line(names[call.population])}: a call with {call.neurons} neurons, {sizes[call.population]} at its first; placed with the first")
            break
    calls = {p: sum(call.population == p for call in traced.calls) for p in range(len(names))}
    steps = min(calls.values(), default=0)  # the fewest calls of a population: one a time step
    for p, name in enumerate(names):
        if steps and calls[p] > steps:
            notes.append(
                f"{one_line(name)}: called {calls[p]} times where other populations step {steps} times, continuing one chain of "
                "state (one population); if its calls are several layers, give each layer a module (or a state) of its own"
            )
    if any(not call.batch_found for call in traced.calls):
        unsure = sorted({names[c.population] for c in traced.calls if not c.batch_found})
        notes.append(f"the batch dim of the spikes of {', '.join(map(one_line, unsure))} could not be followed from the example; dim 0 taken as the batch")
    if not names:
        return Placement(spec, [], problems or [
            "no spiking neurons found (snnTorch or Norse neurons, run by model(example)): name the neuron modules, "
            "e.g. place(model, example, neurons=('hidden.lif', 'out.lif'))"
        ], notes)
    graph = _Graph(traced)
    recurrent = {p: ("population", p) in graph.through_synapses(("population", p))[0] for p in sizes}
    for p, module in enumerate(traced.modules):
        if getattr(module, "inhibition", False) is True:  # snnTorch's winner-take-all: every neuron inhibits the others
            recurrent[p] = True
            notes.append(f"{one_line(names[p])}: inhibition=True (each neuron inhibits the others) is read as recurrent: the chip holds it as synapses within one core")
    fronts, _ = graph.through_synapses(INPUT)
    front = {p for _, p in fronts}
    populations = [Population(names[p], sizes[p] or 0, recurrent[p], p in front) for p in sizes]
    notes += _cycles(graph, names)
    problems += _input_problems(traced, graph, spec, names, front, sizes)
    problems += _neuron_problems(traced, spec, names, candidates, notes)
    if any(size is None for size in sizes.values()):
        return Placement(spec, populations, problems, notes)
    placed, capacity_problems = _assign(populations, spec)
    problems += capacity_problems
    return Placement(spec, populations if problems else placed, problems, notes)


def _reach(follows: dict[int, set[int]], start: int) -> set[int]:
    reach, stack = set(), list(follows[start])
    while stack:
        q = stack.pop()
        if q not in reach:
            reach.add(q)
            stack.extend(follows[q])
    return reach


def _cycles(graph: _Graph, names: list[str]) -> list[str]:
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
            notes.append(f"{members} feed each other in a cycle (not a recurrent population's own connections): the vendor's docs do not say whether the chip allows it")
    return notes


def _input_problems(traced: Trace, graph: _Graph, spec: ChipSpec, names: list[str], front: set[int], sizes: dict) -> list[str]:
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


def _neuron_problems(traced: Trace, spec: ChipSpec, names: list[str], candidates: dict[str, nn.Module], notes: list[str]) -> list[str]:
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
                problems.append(f"{name}: its neurons adapt ({type(neuron).__name__}); the chip's neurons have one fixed threshold and no adaptation")
            if reset is None:
                notes.append(f"{name}: its reset cannot be read (an snnTorch or Norse neuron, or a 'reset_mechanism' attribute, says it)")
            elif spec.reset is not None and reset != spec.reset:
                problems.append(f"{name}: it {_RESETS.get(reset, f'resets {reset}')}; the chip {_RESETS[spec.reset]} (ChipSpec.reset={spec.reset!r})")
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


# --- placing populations on the cores, in blocks -------------------------------------------------


@dataclass
class _Core:
    """A core's room: whole blocks free, and its short last block (``capacity % group_size``
    neurons, for a population's short last block)."""

    blocks: int
    tail: int
    tail_free: bool = True


def _blocks(neurons: int, group_size: int) -> tuple[int, int]:
    """Blocks a population of ``neurons`` takes, and how many neurons its last block holds."""
    count = -(-neurons // group_size)
    return count, neurons - (count - 1) * group_size


def _assign(populations: list[Population], spec: ChipSpec) -> tuple[list[Population], list[str]]:
    """Recurrent populations whole in one core each (an exact search); feed-forward ones in the
    blocks left, whole where a core holds them, else split between blocks.  Each population and
    each piece starts at a block of its core."""
    g, cores = spec.group_size, spec.cores
    total, capacity = sum(p.neurons for p in populations), sum(cores)
    largest = max(cores)
    problems = []
    if total > capacity:
        problems.append(f"the network has {total} neurons; the chip holds {capacity} ({' + '.join(map(str, cores))})")
    for p in populations:
        if p.recurrent and p.neurons > largest:
            problems.append(f"{one_line(p.name)}: a recurrent population of {p.neurons} neurons sits whole in one core, and the largest core holds {largest}")
    if problems:
        return populations, problems
    recurrent = [i for i, p in enumerate(populations) if p.recurrent]
    forward = [i for i, p in enumerate(populations) if not p.recurrent]
    sizes = [populations[i].neurons for i in recurrent]
    any_recurrent_fit = False
    for where in _recurrent_assignments(sizes, cores, g):
        any_recurrent_fit = True
        found = _with_forward(populations, recurrent, where, forward, cores, g)
        if found is not None:
            return found, []
    if not any_recurrent_fit:
        listed = ", ".join(f"{one_line(populations[i].name)} ({populations[i].neurons})" for i in recurrent)
        return populations, [
            f"the recurrent populations {listed} each sit whole in one core, in blocks of {g} from its first neuron, and no "
            f"assignment fits them in cores ({', '.join(map(str, cores))})"
        ]
    padded = sum(_blocks(p.neurons, g)[0] * g for p in populations)
    return populations, [
        f"each population starts at a block of {g} in its core, and a split one is cut between blocks: padded so, the "
        f"{len(populations)} populations need up to {padded} neurons, and no placement fits them in cores ({', '.join(map(str, cores))})"
    ]


def _recurrent_assignments(sizes: list[int], cores: Sequence[int], g: int):
    """Every way to put each recurrent population whole in one core, in blocks (the short last
    block of a population may take a core's short last block), cores of equal room tried once.
    Yields ``(core, in its short last block)`` per population."""
    rooms = [_Core(c // g, c % g) for c in cores]
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    where = [(0, False)] * len(sizes)

    def search(k: int):
        if k == len(order):
            yield list(where)
            return
        i, tried = order[k], set()
        count, last = _blocks(sizes[i], g)
        for core, room in enumerate(rooms):
            for tail in (False, True):
                needed = count - tail
                fits = room.blocks >= needed and (not tail or (room.tail_free and last <= room.tail))
                state = (room.blocks, room.tail_free, room.tail, tail)
                if not fits or state in tried:
                    continue
                tried.add(state)
                room.blocks -= needed
                room.tail_free = room.tail_free and not tail
                where[i] = (core, tail)
                yield from search(k + 1)
                room.blocks += needed
                if tail:
                    room.tail_free = True

    yield from search(0)


def _with_forward(populations, recurrent, where, forward, cores, g) -> list[Population] | None:
    """The placement with the recurrent populations where ``where`` puts them and the
    feed-forward ones in the blocks left, or None when they do not fit."""
    rooms = [_Core(c // g, c % g) for c in cores]
    pieces: dict[int, list[tuple[int, int, bool]]] = {}  # population -> (core, neurons, ends in the core's short last block)
    for i, (core, tail) in zip(recurrent, where):
        count, _ = _blocks(populations[i].neurons, g)
        rooms[core].blocks -= count - tail
        rooms[core].tail_free = rooms[core].tail_free and not tail
        pieces[i] = [(core, populations[i].neurons, tail)]
    # the cores' short last blocks take feed-forward populations' short last blocks, the largest first
    in_tail: dict[int, int] = {}
    for core in sorted((c for c, room in enumerate(rooms) if room.tail_free and room.tail), key=lambda c: -rooms[c].tail):
        fitting = [i for i in forward if i not in in_tail and _blocks(populations[i].neurons, g)[1] <= rooms[core].tail]
        if fitting:
            chosen = max(fitting, key=lambda i: _blocks(populations[i].neurons, g)[1])
            in_tail[chosen] = core
            rooms[core].tail_free = False
    needed = sum(_blocks(populations[i].neurons, g)[0] - (i in in_tail) for i in forward)
    if needed > sum(room.blocks for room in rooms):
        return None
    for i in forward:
        count, last = _blocks(populations[i].neurons, g)
        tail_core = in_tail.get(i)
        whole = count - (tail_core is not None)
        if tail_core is not None and rooms[tail_core].blocks >= whole:  # all of it where its last block is
            rooms[tail_core].blocks -= whole
            pieces[i] = [(tail_core, populations[i].neurons, True)]
            continue
        holding = [c for c, room in enumerate(rooms) if room.blocks >= whole]
        if tail_core is None and holding:  # whole in the fullest core that holds it
            core = min(holding, key=lambda c: (rooms[c].blocks, c))
            rooms[core].blocks -= whole
            pieces[i] = [(core, populations[i].neurons, False)]
            continue
        left, remaining, pieces[i] = whole, populations[i].neurons - (0 if tail_core is None else last), []
        in_tail_core = 0  # whole blocks in the core of its short last block: one piece with it, laid out before it
        for core in sorted(range(len(rooms)), key=lambda c: c != tail_core):
            take = min(rooms[core].blocks, left)
            if take:
                rooms[core].blocks, left = rooms[core].blocks - take, left - take
                neurons = min(take * g, remaining)
                remaining -= neurons
                if core == tail_core:
                    in_tail_core = neurons
                else:
                    pieces[i].append((core, neurons, False))
        if tail_core is not None:
            pieces[i].append((tail_core, in_tail_core + last, True))
    return _laid_out(populations, pieces, cores, g)


def _laid_out(populations: list[Population], pieces: dict[int, list[tuple[int, int, bool]]], cores: Sequence[int], g: int) -> list[Population]:
    """Each piece's first neuron in its core: block-aligned, the piece that ends in the core's
    short last block laid out last."""
    used = [0] * len(cores)
    offsets: dict[int, dict[int, int]] = {i: {} for i in pieces}
    for tail, i, k in sorted((tail, i, k) for i, parts in pieces.items() for k, (_, _, tail) in enumerate(parts)):
        core, neurons, _ = pieces[i][k]
        offsets[i][core] = used[core]
        used[core] += -(-neurons // g) * g
    return [
        Population(p.name, p.neurons, p.recurrent, p.front_end, {c: n for c, n, _ in pieces[i]}, offsets[i])
        for i, p in enumerate(populations)
    ]
