"""Placing a network on the chip's cores: does the network itself fit, and if not, which rule does
which population break.

The chip's capacity, from the vendor's SDK documentation ("Chip overview"): H1v1 has 4 cores of
64 neurons, H1v2 cores of 50, 50 and 100 (:attr:`ChipSpec.cores <nwave_param.ChipSpec.cores>`).
Feed-forward connections run within and between cores, so a feed-forward population may be
split across cores; recurrent connections are all-to-all but only within one core, so a
recurrent population sits whole in one core.  The front end's ``spec.inputs`` (16) channels each
feed one neuron of the first layer.

:func:`place` checks capacity and connectivity only: the neuron dynamics (threshold, membrane
clipping, reset, tau) stay the user's model, and how blocks of ``group_size`` neurons lie inside
a core is not documented, so it is not checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import state
from .discovery import constraints, is_weight_name
from .parametrization import latent
from .report import aligned
from .spec import ChipSpec

__all__ = ["Placement", "Population", "neuron_types", "pack", "place"]


@dataclass(frozen=True)
class Population:
    """One neuron module of the network, and where it sits.

    ``cores`` maps a core's index to the neurons placed there (empty when the network does not fit).
    """

    name: str
    neurons: int
    recurrent: bool
    front_end: bool
    cores: dict[int, int] = field(default_factory=dict)

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
        }


@dataclass(frozen=True)
class Placement:
    """Where a network's populations sit on the chip, or the rules it breaks (one line each)."""

    spec: ChipSpec
    populations: list[Population]
    problems: list[str]

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
        }

    def __str__(self) -> str:
        cores = ", ".join(f"{n}" for n in self.spec.cores)
        header = f"cores ({cores}), {self.spec.inputs} inputs: " + ("fits" if self.fits else "does NOT fit")
        rows = [
            [p.name, str(p.neurons), p.kind, ", ".join(f"core {c}: {n}" for c, n in p.cores.items()) or "-"]
            for p in self.populations
        ]
        lines = [header, *aligned([["population", "neurons", "kind", "cores"], *rows], "lrll")] if rows else [header]
        return "\n".join(lines + [f"problem: {problem}" for problem in self.problems])


def neuron_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The spiking-neuron classes :func:`place` finds by itself, and those it leaves out:
    snnTorch's ``SpikingNeuron`` (Leaky, RLeaky, Synaptic, RSynaptic, ...) and Norse's neuron
    modules and cells (LIF, LIFRecurrent, LIFCell, LIFRecurrentCell, ...), each when installed;
    but not Norse's leaky integrators (LI, LICell, LIBoxCell), which do not spike."""
    found: list[type] = []
    silent: list[type] = []
    try:
        from snntorch._neurons import SpikingNeuron

        found.append(SpikingNeuron)
    except ImportError:
        pass
    try:
        from norse.torch.module.snn import SNN, SNNCell, SNNRecurrent, SNNRecurrentCell

        found += [SNN, SNNCell, SNNRecurrent, SNNRecurrentCell]
        from norse.torch.module.leaky_integrator import LI, LICell
        from norse.torch.module.leaky_integrator_box import LIBoxCell

        silent += [LI, LICell, LIBoxCell]
    except ImportError:
        pass
    return tuple(found), tuple(silent)


def pack(sizes: Sequence[int], cores: Sequence[int]) -> list[int] | None:
    """A core for each of ``sizes`` such that no core holds more than its capacity, or None when
    there is none.  Exact: a depth-first search, largest sizes first, that tries one core of each
    free capacity (cores with equal room are interchangeable for what is left)."""
    if sum(sizes) > sum(cores):
        return None
    order = sorted(range(len(sizes)), key=lambda i: -sizes[i])
    free, where = list(cores), [0] * len(sizes)

    def search(k: int) -> bool:
        if k == len(order):
            return True
        i, tried = order[k], set()
        for core, room in enumerate(free):
            if room >= sizes[i] and room not in tried:
                tried.add(room)
                free[core] -= sizes[i]
                where[i] = core
                if search(k + 1):
                    return True
                free[core] += sizes[i]
        return False

    return where if search(0) else None


def place(model: nn.Module, example: Tensor, spec: ChipSpec | None = None, *, neurons: str | Iterable[str] = ()) -> Placement:
    """Check that ``model``'s spiking populations can be placed on the chip's cores.

    Runs ``model(example)`` once under ``torch.no_grad()``, with temporary hooks; afterwards the
    model is exactly as before (parameters, buffers, training mode, hooks), with no gradients.
    ``spec=None`` is the model's registration spec if it is registered, else ``ChipSpec()``.

    A *population* is one neuron module: snnTorch's and Norse's spiking neurons (see
    :func:`neuron_types`) and every module named in ``neurons`` (dotted names).  Its size is the
    last dimension of its spike output (the output, or its first element).  It is *recurrent*
    when it holds a square weight of its size (snnTorch ``RLeaky``/``RSynaptic`` with
    ``all_to_all=True``, Norse's recurrent LIF).  The *front end* is the first population the
    input reaches.  Each broken rule is one line in ``problems``:

    * the example's last dimension is at most ``spec.inputs`` channels;
    * the front end has at most ``spec.inputs`` neurons, and every weight applied before it has
      at most one non-zero entry per output neuron (a gain per channel, or a diagonal matrix);
    * the network has at most ``sum(spec.cores)`` neurons;
    * every recurrent population sits whole in one core (several share one while they fit);
      feed-forward populations fill what is left, split across cores as needed.

    Example::

        >>> import snntorch as snn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gain = nn.Linear(16, 16, bias=False)   # the front end's one-to-one synapses
        ...         self.front = snn.Leaky(beta=0.9, init_hidden=True)
        ...         self.hidden = snn.RLeaky(beta=0.9, linear_features=80, init_hidden=True)
        ...         self.fc = nn.Linear(16, 80)
        ...     def forward(self, x):
        ...         return self.hidden(self.fc(self.front(self.gain(x))))
        >>> net = Net()
        >>> with torch.no_grad():
        ...     _ = net.gain.weight.copy_(torch.eye(16))
        >>> print(place(net, torch.rand(4, 16), ChipSpec(limit=1.66, cores=(50, 50, 100))))
        cores (50, 50, 100), 16 inputs: fits
        population  neurons  kind                     cores
        front            16  feed-forward, front end  core 2: 16
        hidden           80  recurrent                core 2: 80
        >>> print(place(net, torch.rand(4, 16), ChipSpec(cores=(64, 64))))
        cores (64, 64), 16 inputs: does NOT fit
        population  neurons  kind                     cores
        front            16  feed-forward, front end  -
        hidden           80  recurrent                -
        problem: hidden: a recurrent population of 80 neurons sits whole in one core, and the largest core holds 64

    Raises:
        TypeError: ``model`` is not a module, ``example`` not a tensor, ``spec`` not a ChipSpec.
        ValueError: a name in ``neurons`` is not a module of ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"place: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, Tensor):
        raise TypeError(f"place: example must be a tensor (the input of model(example)), got {type(example).__name__}")
    spec = _spec_of(model) if spec is None else spec
    if not isinstance(spec, ChipSpec):
        raise TypeError(f"place: spec must be a ChipSpec or None, got {type(spec).__name__}")
    named = (neurons,) if isinstance(neurons, str) else tuple(neurons)
    modules = dict(model.named_modules())
    for name in named:
        if not isinstance(name, str) or name not in modules:
            raise ValueError(f"place: neurons names {name!r}, which is not a module of the model (names are dotted, as named_modules() gives them)")
    candidates = _neuron_modules(model, set(named))
    started, ended, outputs = _run(model, example, candidates)
    problems = [f"{name} (named in neurons) never ran in model(example)" for name in named if name not in outputs]
    populations, path = [], {}
    for name in sorted(outputs, key=started.__getitem__):
        size = _size(outputs[name])
        if size is None:
            problems.append(f"{name}: its output is not a tensor of spikes (nor a tuple starting with one): name a module that outputs spikes")
            continue
        populations.append(Population(name or type(model).__name__, size, _recurrent(modules[name], size), front_end=not populations))
        path[populations[-1].name] = name
    if not populations:
        return Placement(spec, [], problems or [
            "no spiking neurons found (snnTorch or Norse neurons, run by model(example)): name the neuron modules, "
            "e.g. place(model, example, neurons=('hidden.lif', 'out.lif'))"
        ])
    front = populations[0]
    before = [(name, modules[name]) for name, end in ended.items() if end < started[path[front.name]]]  # ran, and ended, before it
    problems += _input_problems(example, spec, front, before)
    problems += _capacity_problems(populations, spec)
    if problems:
        return Placement(spec, populations, problems)
    return Placement(spec, _assign(populations, spec), [])


def _spec_of(model: nn.Module) -> ChipSpec:
    found = next(constraints(model), None)
    return found.constraint.settings.spec if found is not None else ChipSpec()


def _neuron_modules(model: nn.Module, named: set[str]) -> dict[str, nn.Module]:
    """The neuron modules by name; a neuron module inside another is part of that population."""
    spiking, silent = neuron_types()
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(outer == "" or name.startswith(f"{outer}.") for outer in found)
        neuron = isinstance(module, spiking) and not isinstance(module, silent)
        if not inside and (name in named or neuron):
            found[name] = module
    return found


def _run(model: nn.Module, example: Tensor, candidates: dict[str, nn.Module]) -> tuple[dict[str, int], dict[str, int], dict[str, object]]:
    """Run ``model(example)``; return when each module started and ended its first forward (event
    numbers), and each candidate's first output.  Everything the forward changes is put back."""
    clock = itertools.count()
    started: dict[str, int] = {}
    ended: dict[str, int] = {}
    outputs: dict[str, object] = {}

    def on_start(name: str):
        def hook(module, args):
            started.setdefault(name, next(clock))

        return hook

    def on_end(name: str):
        def hook(module, args, output):
            ended.setdefault(name, next(clock))
            if name in candidates:
                outputs.setdefault(name, output)

        return hook

    saved = state.snapshot([model], attributes=True)
    handles = []
    try:
        for name, module in model.named_modules():
            handles += [module.register_forward_pre_hook(on_start(name)), module.register_forward_hook(on_end(name))]
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
        state.restore(saved)
    return started, ended, outputs


def _size(output: object) -> int | None:
    spikes = output[0] if isinstance(output, (tuple, list)) and output else output
    return spikes.shape[-1] if isinstance(spikes, Tensor) and spikes.dim() >= 1 else None


def _recurrent(module: nn.Module, size: int) -> bool:
    """Whether the module holds a square weight of its size, whatever its name (a registered one
    by its latent tensor, of the same shape)."""
    return any(p.dim() == 2 and tuple(p.shape) == (size, size) for p in module.parameters())


def _weights(module: nn.Module) -> list[tuple[str, Tensor]]:
    """The module's own weight-like tensors by name (named as :func:`~nwave_param.trackable_weights`
    reads names), a registered one by its latent value: hardening keeps its zeros zero, and no
    mismatch noise fills them."""
    ours = {name: constraint for name, _, constraint in state.chip_links(module)}
    found = [(name, value) for name, value in module._parameters.items() if value is not None and is_weight_name(name)]
    for name in getattr(module, "parametrizations", {}):
        if is_weight_name(name):
            found.append((name, latent(module, name, ours[name]) if name in ours else getattr(module, name)))
    return found


def _input_problems(example: Tensor, spec: ChipSpec, front: Population, before: list[tuple[str, nn.Module]]) -> list[str]:
    problems = []
    channels = example.shape[-1] if example.dim() else 1
    if channels > spec.inputs:
        problems.append(f"the example has {channels} input channels (its last dimension); the chip's front end has {spec.inputs}")
    if front.neurons > spec.inputs:
        problems.append(
            f"{front.name}: the front end has {front.neurons} neurons; the chip feeds its {spec.inputs} input channels "
            "one-to-one to the first layer, so it holds at most that many"
        )
    for path, module in before:
        for name, weight in _weights(module):
            rows = weight.detach().reshape(weight.shape[0], -1) if weight.dim() >= 2 else weight.detach().reshape(-1, 1)
            most = int((rows != 0).sum(1).max()) if rows.numel() else 0
            if most > 1:
                problems.append(
                    f"{path + '.' if path else ''}{name}: a weight applied before the front end ({front.name}) has up to {most} "
                    "non-zero entries per output neuron; the chip's input channels reach the front end one-to-one (a gain per "
                    "channel, or a diagonal matrix)"
                )
    return problems


def _capacity_problems(populations: list[Population], spec: ChipSpec) -> list[str]:
    problems = []
    total, capacity = sum(p.neurons for p in populations), sum(spec.cores)
    if total > capacity:
        problems.append(f"the network has {total} neurons; the chip holds {capacity} ({' + '.join(map(str, spec.cores))})")
    recurrent = [p for p in populations if p.recurrent]
    largest = max(spec.cores)
    for p in recurrent:
        if p.neurons > largest:
            problems.append(f"{p.name}: a recurrent population of {p.neurons} neurons sits whole in one core, and the largest core holds {largest}")
    if not problems and pack([p.neurons for p in recurrent], spec.cores) is None:
        sizes = ", ".join(f"{p.name} ({p.neurons})" for p in recurrent)
        problems.append(f"the recurrent populations {sizes} each sit whole in one core, and no assignment fits them in cores ({', '.join(map(str, spec.cores))})")
    return problems


def _assign(populations: list[Population], spec: ChipSpec) -> list[Population]:
    """Recurrent populations whole in one core each; feed-forward ones whole in the fullest core
    that still holds them, else split across cores in order."""
    free = list(spec.cores)
    recurrent = [i for i, p in enumerate(populations) if p.recurrent]
    placed: dict[int, dict[int, int]] = {}
    for i, core in zip(recurrent, pack([populations[i].neurons for i in recurrent], spec.cores) or ()):
        placed[i] = {core: populations[i].neurons}
        free[core] -= populations[i].neurons
    for i, p in enumerate(populations):
        if p.recurrent:
            continue
        whole = [core for core, room in enumerate(free) if room >= p.neurons]
        if whole:
            core = min(whole, key=lambda c: (free[c], c))
            placed[i], free[core] = {core: p.neurons}, free[core] - p.neurons
            continue
        left, placed[i] = p.neurons, {}
        for core, room in enumerate(free):
            take = min(room, left)
            if take:
                placed[i][core], free[core], left = take, room - take, left - take
    return [Population(p.name, p.neurons, p.recurrent, p.front_end, dict(sorted(placed[i].items()))) for i, p in enumerate(populations)]

