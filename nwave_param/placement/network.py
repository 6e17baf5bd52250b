"""Placing a network on the chip's cores: does the network itself fit, and if not, which rule does
which population break.

What the network is comes from one traced forward (:mod:`nwave_param.core.trace`), not from the names
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

import torch  # noqa: F401  (the example in the docstring uses it)
from torch import Tensor, nn

from nwave_param.core.discovery import constraints
from nwave_param.core.neurons import is_spiking, neuron_modules
from nwave_param.core.trace import Trace, trace
from nwave_param.errors import one_line
from nwave_param.placement.assignment import assign
from nwave_param.placement.graph import Graph
from nwave_param.placement.result import Placement, Population
from nwave_param.placement.rules import convolution_notes, cycles, input_problems, neuron_problems, series_notes
from nwave_param.spec import H1V2, ChipSpec  # noqa: F401  (H1V2: the docstring's example)

__all__ = ["place"]


def place(
    model: nn.Module, example: Tensor, spec: ChipSpec | None = None, *, neurons: str | Iterable[str] = (), dims: str | None = None
) -> Placement:
    """Check that ``model``'s network can be placed on the chip's cores, and place it.

    Runs ``model(example)`` once under ``torch.no_grad()`` and reads the network from what it
    computes (:mod:`nwave_param.core.trace`); afterwards the model is exactly as before (parameters,
    buffers, training modes, submodules, hooks, torch's random state), with no gradients.

    Args:
        model: the network; snnTorch's and Norse's spiking neurons are found by themselves
            (:func:`~nwave_param.core.neurons.neuron_types`), other neuron modules are named in ``neurons``.
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
            example; the model holds a lazy module not yet initialized, or the model or
            ``example`` a tensor on the meta device.
    """
    _, spec, traced, candidates, named = read_network("place", model, example, spec, neurons, dims)
    return _checked(traced, spec, candidates, named)


def read_network(
    caller: str, model: nn.Module, example: Tensor, spec: ChipSpec | None, neurons: str | Iterable[str], dims: str | None
) -> tuple[nn.Module, ChipSpec, Trace, dict[str, nn.Module], tuple[str, ...]]:
    """The arguments of :func:`place` checked (errors name ``caller``), and the network traced:
    ``(model, spec, trace, neuron modules by name, the names given in neurons)``; a
    ``torch.compile``'d model is read as its module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, Tensor):
        raise TypeError(f"{caller}: example must be a tensor (the input of model(example)), got {type(example).__name__}")
    spec = _spec_of(model) if spec is None else spec
    if not isinstance(spec, ChipSpec):
        raise TypeError(f"{caller}: spec must be a ChipSpec or None, got {type(spec).__name__}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its module, read eagerly
    named = (neurons,) if isinstance(neurons, str) else tuple(neurons)
    modules = dict(model.named_modules())
    for name in named:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(
                f"{caller}: neurons names {one_line(repr(name))}, which is not a module of the model "
                "(names are dotted, as named_modules() gives them)"
            )
    candidates = neuron_modules(model, set(named))
    return model, spec, trace(model, example, candidates, dims), candidates, named


def _spec_of(model: nn.Module) -> ChipSpec:
    found = next(constraints(model), None)
    return found.constraint.settings.spec if found is not None else ChipSpec()


# --- the network, read from the trace ------------------------------------------------------------


def population_names(traced: Trace) -> list[str]:
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


def _checked(traced: Trace, spec: ChipSpec, candidates: dict[str, nn.Module], named: Sequence[str]) -> Placement:
    problems: list[str] = []
    notes = [one_line(note) for note in traced.notes]
    problems += [f"{one_line(name)} (named in neurons) never ran in model(example)" for name in named if name not in traced.populations]
    names = population_names(traced)
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
            problems.append(
                f"{one_line(names[p])}: its output is not a tensor of spikes (nor a tuple starting with one): "
                "name a module that outputs spikes"
            )
    for call in traced.calls:
        if call.neurons is not None and call.neurons != sizes[call.population]:
            notes.append(
                f"{one_line(names[call.population])}: a call with {call.neurons} neurons, {sizes[call.population]} at its first; "
                "placed with the first"
            )
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
        notes.append(
            f"the batch dim of the spikes of {', '.join(map(one_line, unsure))} could not be followed from the example; "
            "dim 0 taken as the batch"
        )
    if not names:
        return Placement(spec, [], problems or [
            "no spiking neurons found (snnTorch or Norse neurons, run by model(example)): name the neuron modules, "
            "e.g. place(model, example, neurons=('hidden.lif', 'out.lif'))"
        ], notes)
    graph = Graph(traced)
    recurrent = {p: ("population", p) in graph.through_synapses(("population", p))[0] for p in sizes}
    for p, module in enumerate(traced.modules):
        if getattr(module, "inhibition", False) is True:  # snnTorch's winner-take-all: every neuron inhibits the others
            recurrent[p] = True
            notes.append(
                f"{one_line(names[p])}: inhibition=True (each neuron inhibits the others) is read as recurrent: "
                "the chip holds it as synapses within one core"
            )
    front = graph.front()
    populations = [Population(names[p], sizes[p] or 0, recurrent[p], p in front) for p in sizes]
    notes += cycles(graph, names)
    problems += input_problems(traced, graph, spec, names, front, sizes)
    problems += neuron_problems(traced, spec, names, candidates, notes)
    notes += series_notes(traced)
    notes += convolution_notes(traced, spec, names, sizes)
    if any(size is None for size in sizes.values()):
        return Placement(spec, populations, problems, notes)
    placed, capacity_problems = assign(populations, spec)
    problems += capacity_problems
    return Placement(spec, populations if problems else placed, problems, notes)
