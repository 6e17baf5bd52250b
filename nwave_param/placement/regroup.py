r"""Regrouping the hidden neurons for the chip's sign sharing: ``nwp.regroup_(model, example, optimizer)``.

The chip's neurons share their input signs in blocks of ``spec.group_size`` consecutive neurons.
Which neurons of a hidden population are consecutive is free: permute the population's neurons,
its incoming weights' output rows, its bias and per-neuron parameters, and its outgoing weights'
input columns alike, and the network computes the same function.  :func:`regroup_` chooses, for
each hidden population, the order whose blocks hold the least minority-sign mass
(:func:`~nwave_param.functional.grouping`), so the sign sharing removes less of what training
learnt.  Call it once, before the constraints start (hardness 0, no penalty yet): the
:class:`~nwave_param.Schedule` says when (``schedule.regroup_step``).

What the network is comes from one traced forward, as for :func:`~nwave_param.place`.  A
population keeps its order when its order shows: the front end (its neurons follow the input
channels), a population whose spikes reach the output or an op other than a weight's inputs, one
fed other than through whole weights, one whose neuron module serves several populations with
per-neuron tensors, one whose weights carry parametrizations with tensors of their own.  And every
reordering is checked before it is made: the reordered model must compute exactly what the model
does on the example (which catches what the trace does not follow, such as spikes returned as an
output), where the population spikes, else it keeps its order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param.core.discovery import constraints
from nwave_param.core.trace import INPUT, Trace, unchanged
from nwave_param.errors import one_line
from nwave_param.functional import grouping, weight_sums
from nwave_param.layout import Layout
from nwave_param.placement.graph import Graph
from nwave_param.placement.network import population_names, read_network
from nwave_param.spec import ChipSpec

__all__ = ["Regrouping", "regroup_"]

Move = tuple[str, tuple[int, ...]]  # a stored tensor's name in the model, and its dims that index the population's neurons


@dataclass(frozen=True)
class Regrouping:
    """What :func:`regroup_` did.

    Attributes:
        orders: a regrouped population's name to its order: its neuron ``i`` is the former neuron ``order[i]``.
        minority: a population's name to the minority-sign mass of its incoming weights' blocks,
            ``(before, after)`` (the topology sum of :func:`~nwave_param.functional.weight_sums`).
        kept: a population's name to why it keeps its order.
        moves: a regrouped population's name to the tensors it moved, by name, with their dims.
    """

    orders: dict[str, Tensor] = field(default_factory=dict)
    minority: dict[str, tuple[float, float]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    moves: dict[str, tuple[Move, ...]] = field(default_factory=dict)

    def apply_(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Reorder another copy of the network alike (an EMA copy, a replica): the same tensors,
        by name, the same orders, and ``optimizer``'s state with them.  Meant for a copy in the
        former order: applied to a copy already reordered, it reorders again.

        Raises:
            KeyError: ``model`` holds no tensor of one of the names moved (nothing is changed).
            ValueError: a tensor, or its optimizer state, has not the shape moved (nothing is changed).
            TypeError: ``optimizer`` is not a torch optimizer.
        """
        _check_optimizer("Regrouping.apply_", optimizer)
        # every tensor first: a refusal moves nothing
        targets = {p: _targets(model, moves, self.orders[p], optimizer) for p, moves in self.moves.items()}
        for population, found in targets.items():
            _move(found, self.orders[population])

    def __str__(self) -> str:
        lines = []
        for name, (before, after) in self.minority.items():
            state = "regrouped" if name in self.orders else "already grouped"
            lines.append(f"{one_line(name)}: {state}, minority-sign mass {before:.4g} -> {after:.4g}")
        lines += [f"{one_line(name)}: kept, {reason}" for name, reason in self.kept.items()]
        return "\n".join(lines) or "no populations of neurons found (name neuron modules with neurons=)"


def regroup_(
    model: nn.Module,
    example: Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    spec: ChipSpec | None = None,
    neurons: str | Iterable[str] = (),
    dims: str | None = None,
) -> Regrouping:
    r"""Reorder each hidden population's neurons so that its blocks of ``spec.group_size`` share
    more of their input signs; the network computes the same function.

    For population :math:`p` and order :math:`\pi`: its incoming weights' rows, its bias, its
    per-neuron parameters and state, and its outgoing weights' columns are all permuted by
    :math:`\pi` (a recurrent weight both ways); ``optimizer``'s state (Adam's moments) moves with
    the parameters.  :math:`\pi` is :func:`~nwave_param.functional.grouping` of the population's
    incoming weights side by side.  Deterministic: the orders depend on the weights alone;
    whether a population passes the check depends on ``example`` too, so under DDP give every
    process the same example (a fixed batch, not its own).  Reorder other copies (an EMA model) with :meth:`Regrouping.apply_`.

    Args:
        model: the network, registered or not, computing at hardness 0.
        example: an input, as for :func:`~nwave_param.place`.
        optimizer: the optimizer training ``model``, whose state must move with the weights.
        spec: the chip (its ``group_size``); None takes the model's registration spec.
        neurons: dotted names of neuron modules, as for :func:`~nwave_param.place`.
        dims: the example's dims, as for :func:`~nwave_param.place`.

    Returns:
        A :class:`Regrouping`: the orders, the minority-sign mass before and after, and why a
        population kept its order.

    Example::

        >>> import snntorch as snn
        >>> import nwave_param as nwp
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.front, self.fc = snn.Leaky(beta=0.9), nn.Linear(4, 10)
        ...         self.hidden, self.out = snn.Leaky(beta=0.9, threshold=0.5), nn.Linear(10, 2)
        ...     def forward(self, x):
        ...         spikes, _ = self.front(x, torch.zeros_like(x))
        ...         spikes, _ = self.hidden(self.fc(spikes), torch.zeros(len(x), 10))
        ...         return self.out(spikes)
        >>> _ = torch.manual_seed(0); net = Net(); x = 3 * torch.rand(8, 4)
        >>> before = net(x)
        >>> print(regroup_(net, x, spec=nwp.H1V2))
        hidden: regrouped, minority-sign mass 3.061 -> 1.743
        front: kept, the front end: its neurons follow the input channels
        >>> torch.allclose(net(x), before)
        True

    Raises:
        TypeError: ``model``, ``example``, ``spec`` or ``optimizer`` of the wrong type.
        ValueError: the model computes at a hardness above 0 (regroup before hardening); the
            optimizer holds a state for a moved weight whose shape it cannot reorder; or as
            :func:`~nwave_param.place` raises.  Nothing is moved then.
    """
    _check_optimizer("regroup_", optimizer)
    model, spec, traced, _, _ = read_network("regroup_", model, example, spec, neurons, dims)
    hardness = max((entry.constraint.settings.hardness for entry in constraints(model)), default=0.0)
    if hardness > 0:
        raise ValueError(
            f"regroup_: the model computes at hardness {hardness:g}, where the order of its neurons shows; "
            "regroup before hardening (at hardness 0, as the Schedule's regroup_step is)"
        )
    names = population_names(traced)
    result = Regrouping()
    planned: dict[str, tuple[tuple[Move, ...], Tensor]] = {}
    front = Graph(traced).front()
    for p, name in enumerate(names):
        plan = _plan(model, traced, p, p in front)
        if isinstance(plan, str):
            result.kept[name] = plan
            continue
        moves, incoming = plan
        order = grouping(incoming, spec.group_size)
        regrouped = incoming[order.to(incoming.device)]
        result.minority[name] = (_minority(incoming, spec), _minority(regrouped, spec))
        if not torch.equal(order, torch.arange(len(order), device=order.device)):
            planned[name] = (moves, order)

    def keep(unplanned: list[str], reason: str) -> None:
        for name in unplanned:
            del planned[name], result.minority[name]
            result.kept[name] = reason

    silent = _silent(model, example, traced)
    keep(
        [n for n in planned if names.index(n) in silent],
        "its neurons never spike on the example, so the check cannot see their order: give an example they respond to",
    )
    modules_of = {name: traced.modules[names.index(name)] for name in planned}
    keep(
        [n for n in planned if not _computes_alike(model, example, {n: planned[n]}, modules_of)],
        "reordered, model(example) computes otherwise: something reads its order that the trace does not follow",
    )
    if len(planned) > 1 and not _computes_alike(model, example, planned, modules_of):
        keep(list(planned), "reordering the populations together changes what model(example) computes")
    targets = {name: _targets(model, moves, order, optimizer) for name, (moves, order) in planned.items()}  # may refuse: nothing moved
    for name, (moves, order) in planned.items():
        _move(targets[name], order)
        result.orders[name], result.moves[name] = order, moves
    return result


# --- which tensors index a population's neurons -----------------------------------------------------


def _plan(model: nn.Module, traced: Trace, p: int, front: bool) -> str | tuple[tuple[Move, ...], Tensor]:
    """The tensors to move for population ``p`` and its incoming weights side by side
    ``(neurons, columns)``; or why its order stays (a string)."""
    n = traced.neurons(p)
    if front:
        return "the front end: its neurons follow the input channels"
    if n is None:
        return "its output is not a tensor of spikes"
    own = {("spikes", p), ("state", p), ("own", p)}
    readers = [use for use in traced.all_uses if use.reads & own]
    if not readers:
        return "no synapse reads its spikes: its order is the model's output"
    for use in readers:
        if not use.parameter or use.inputs is None or use.groups != 1 or use.gates != 1:
            return f"{one_line(use.where)} reads its spikes other than as one weight's inputs: its order shows"
    reached = traced.feeds.get(p, frozenset()) - own
    if any(token == INPUT or token[0] != "current" for token in reached):
        return "the input or another population reaches it without synapses"
    incoming = [traced.all_uses[index] for _, index in sorted(reached)]
    for use in incoming:
        if not use.parameter or use.outputs is None or use.groups != 1 or use.gates != 1 or use.rows != n:
            return f"{one_line(use.where)} feeds it other than as one weight's output rows"
    dims: dict[str, set[int]] = {}
    for use in incoming:
        dims.setdefault(use.name, set()).add(use.outputs)
    for use in readers:
        dims.setdefault(use.name, set()).add(use.inputs)
    moves: list[Move] = []
    for weight, weight_dims in dims.items():
        stored = _stored(model, weight, weight_dims, n)
        if isinstance(stored, str):
            return stored
        moves += stored
        path, _, local = weight.rpartition(".")
        bias = getattr(model.get_submodule(path), "bias", None) if local == "weight" else None
        if isinstance(bias, nn.Parameter) and any(u.name == weight for u in incoming) and bias.shape == (n,):
            moves.append((f"{path}.bias" if path else "bias", (0,)))
    neuron_path = traced.populations[p]
    shared = sum(module is traced.modules[p] for module in traced.modules) > 1
    for local, tensor in [*traced.modules[p].named_parameters(recurse=False), *traced.modules[p].named_buffers(recurse=False)]:
        if tensor.numel() <= 1:
            continue
        if shared:
            return f"its neuron module serves several populations and holds {one_line(local)} per neuron: no one order fits them all"
        if tensor.shape[-1] != n:
            return f"its neuron module holds {one_line(local)} of shape {tuple(tensor.shape)}: not one value per neuron"
        moves.append((f"{neuron_path}.{local}" if neuron_path else local, (tensor.dim() - 1,)))
    columns = [
        _weight(model, use.name).detach().movedim(use.outputs, 0).reshape(n, -1)
        for use in {use.name: use for use in incoming}.values()
    ]
    return tuple(moves), torch.cat([c.to(columns[0].dtype) for c in columns], 1)


def _stored(model: nn.Module, weight: str, dims: set[int], n: int) -> str | list[Move]:
    """The stored tensors of ``weight`` (the Parameter, or a parametrization's originals) and the
    ``dims`` of each to move; or why they cannot be."""
    path, _, local = weight.rpartition(".")
    module = model.get_submodule(path)
    prefix = f"{path}." if path else ""
    if parametrize.is_parametrized(module, local):
        chain = module.parametrizations[local]
        own = [name for link in chain for name, _ in (*link.named_parameters(), *link.named_buffers())]
        if own:
            return f"its weight {one_line(weight)} is parametrized with a tensor of its own ({one_line(own[0])}) it cannot follow"
        stored = [(f"{prefix}parametrizations.{local}.{k}", t) for k, t in chain.named_parameters(recurse=False)]
    else:
        stored = [(weight, getattr(module, local))]
    shape = _weight(model, weight).shape
    moves = []
    for name, tensor in stored:
        if tensor.dim() != len(shape):
            return f"its weight {one_line(weight)} is stored as {tuple(tensor.shape)}, not in the weight's dims"
        if any(tensor.shape[d] not in (n, 1) for d in dims):
            return f"its weight {one_line(weight)} does not hold one row or column per neuron"
        moves.append((name, tuple(d for d in sorted(dims) if tensor.shape[d] == n)))
    return moves


def _check_optimizer(caller: str, optimizer: object) -> None:
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{caller}: optimizer must be a torch optimizer or None, got {type(optimizer).__name__}")


def _weight(model: nn.Module, name: str) -> Tensor:
    path, _, local = name.rpartition(".")
    return getattr(model.get_submodule(path), local)


def _tensor(model: nn.Module, name: str) -> Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        try:
            return model.get_buffer(name)
        except AttributeError:
            raise KeyError(f"regroup: the model holds no tensor {one_line(name)}") from None


def _minority(m: Tensor, spec: ChipSpec) -> float:
    return weight_sums(m, Layout(), spec, 1)[1].item()


# --- moving, and checking first ---------------------------------------------------------------------


def _targets(
    model: nn.Module, moves: tuple[Move, ...], order: Tensor, optimizer: torch.optim.Optimizer | None
) -> list[tuple[Tensor, tuple[int, ...]]]:
    """Every tensor to permute, with its dims: each moved tensor, its ``.grad``, and ``optimizer``'s
    state for it (a state reduced over a dim, size 1 there, as Adafactor's, stays along that dim).
    Raises ValueError, before anything moves, for a tensor or a state it cannot reorder."""
    n, targets = len(order), []
    for name, dims in moves:
        tensor = _tensor(model, name)
        if tensor.numel() == 0:  # a neuron's state not yet made (a copy that never ran): nothing to move
            continue
        if any(d >= tensor.dim() or tensor.shape[d] != n for d in dims):
            raise ValueError(f"regroup: {one_line(name)} has shape {tuple(tensor.shape)}, not {n} neurons along {dims}; nothing was moved")
        state = {} if optimizer is None else optimizer.state.get(tensor, {})
        extra = [tensor.grad] if isinstance(tensor, nn.Parameter) and tensor.grad is not None else []
        extra += [v for v in state.values() if isinstance(v, Tensor) and v.numel() > 1]
        targets.append((tensor, dims))
        for value in extra:
            if value.dim() != tensor.dim() or any(value.shape[d] not in (n, 1) for d in dims):
                raise ValueError(
                    f"regroup: the optimizer's state for {one_line(name)} has shape {tuple(value.shape)}, which it cannot reorder "
                    "with the weight; nothing was moved"
                )
            targets.append((value, tuple(d for d in dims if value.shape[d] == n)))
    return targets


def _permuted(tensor: Tensor, dims: Iterable[int], order: Tensor) -> Tensor:
    """``tensor`` with each of ``dims`` taken in ``order``, by logical index (any strides, any memory format)."""
    for d in dims:
        tensor = tensor.index_select(d, order.to(tensor.device))
    return tensor


@torch.no_grad()
def _move(targets: list[tuple[Tensor, tuple[int, ...]]], order: Tensor) -> None:
    """Permute each tensor along its dims, in place."""
    for target, dims in targets:
        target.copy_(_permuted(target, dims, order))


@torch.no_grad()
def _computes_alike(
    model: nn.Module, example: Tensor, planned: dict[str, tuple[tuple[Move, ...], Tensor]], neurons: dict[str, nn.Module]
) -> bool:
    """Whether ``model`` with its tensors reordered as ``planned`` computes on ``example`` exactly
    what it computes now: its output, and what each reordered population's module (``neurons``, by
    population) outputs at every call, its neurons reordered (spikes and membranes: a per-neuron
    tensor left unmoved shows at once).

    Exactly: both runs take every floating tensor rounded to a multiple of 1/64 plus a draw of
    0 to 15 1024ths per entry, so that a synapse's sum over its inputs (spikes, or any values a
    reorder does not move) is exact in any order and a reorder cannot flip a spike by rounding,
    while per-neuron values that differ only slightly (a learnt decay near its start) differ
    enough to show a tensor left unmoved.
    """
    draws = torch.Generator().manual_seed(0)
    values = {
        name: (t.detach() * 64).round() / 64 + torch.randint(16, t.shape, generator=draws).to(t) / 1024
        if t.is_floating_point()
        else t.detach()
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    moved = dict(values)
    for moves, order in planned.values():
        for name, dims in moves:
            moved[name] = _permuted(moved[name], dims, order)
    modules = [neurons[name] for name in planned]
    (before, calls_before), (after, calls_after) = (_run(model, example, tensors, modules) for tensors in (values, moved))
    for module, (_, order) in zip(modules, planned.values()):
        n = len(order)
        reordered = [
            [_permuted(t, (-1,), order) if isinstance(t, Tensor) and t.dim() and t.shape[-1] == n else t for t in call]
            for call in calls_before[id(module)]
        ]
        if not _alike(reordered, calls_after[id(module)]):
            return False
    return _alike(before, after)


def _silent(model: nn.Module, example: Tensor, traced: Trace) -> set[int]:
    """The populations whose module outputs no spike on ``example``."""
    _, calls = _run(model, example, None, traced.modules)
    fired = {key for key, outputs in calls.items() if any(isinstance(c[0], Tensor) and bool(c[0].ne(0).any()) for c in outputs)}
    return {p for p, module in enumerate(traced.modules) if id(module) not in fired}  # bool(): once per call, off the hot path


@torch.no_grad()
def _run(model: nn.Module, example: Tensor, tensors: dict[str, Tensor] | None, modules: list[nn.Module]) -> tuple[object, dict[int, list]]:
    """``model(example)`` in eval mode from one random seed, with ``tensors`` in place of its own
    (``torch.func.functional_call``; None: its own), and what each of ``modules`` output at every
    call (a list of tensors per call, by ``id(module)``).  The model, its hooks and every random
    state (CPU and the CUDA devices it uses) are left as they were."""
    calls: dict[int, list] = {id(module): [] for module in modules}
    devices = sorted({t.device.index or 0 for t in [example, *model.parameters(), *model.buffers()] if t.device.type == "cuda"})
    with unchanged(model), torch.random.fork_rng(devices=devices):
        model.eval()
        torch.manual_seed(0)
        handles = [
            module.register_forward_hook(lambda m, i, o: calls[id(m)].append(list(o) if isinstance(o, (tuple, list)) else [o]))
            for module in {id(m): m for m in modules}.values()
        ]
        try:
            output = model(example) if tensors is None else torch.func.functional_call(model, tensors, (example,))
        finally:
            for handle in handles:
                handle.remove()
    return output, calls


def _alike(a: object, b: object) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(map(_alike, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_alike(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b
