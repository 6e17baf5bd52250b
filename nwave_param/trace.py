"""What a network computes, read from one traced forward.

:func:`trace` runs ``model(example)`` once, under ``torch.no_grad()``, inside a
:class:`~torch.overrides.TorchFunctionMode` that follows every tensor the forward makes:

* **where its values come from**: the example's channels, a population's spikes or membrane
  state, a weight's current (its *activation* sources); or the Parameters it is made of, through
  views and elementwise ops such as a mask ``weight * diagonal`` or a parametrization's output
  (a *weight*), and which of the Parameter's dims each of its dims is;
* **which of its dims are the example's batch and time**.

An op that consumes a weight and an activation is a **synapse** (a :class:`Use`): ``F.linear``,
``matmul`` / ``@`` / ``mm`` / ``bmm``, ``einsum``, convolutions and transposed convolutions,
torch's RNN ops and cells, ``F.bilinear``, and outside a neuron an elementwise product (a gain).
The op says which of the weight's dims indexes the output neurons and which the inputs:
``x @ W`` reads ``W`` as ``[in, out]``, the chip vendor's convention; ``F.linear(x, W)`` as
``[out, in]``, torch's.

A **population** is one chain of membrane state of a neuron module.  Calls of the module whose
state carries from one call to the next (the state it is given, or, given none, the state it
keeps in its buffers, as snnTorch's neurons do) are one population; calls that each start their
own state, such as one module applied to two layers, are separate populations.  Its neurons are
every element of its spikes but the batch and the time.  What reaches a call's spikes (weights'
currents, the input, other populations' spikes) feeds its population.

What the trace cannot see: a weight used through a custom autograd Function whose forward calls
no torch function, or through a C extension, is no synapse to it.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakTensorKeyDictionary

from . import state
from .layout import Layout
from .parametrization import tracing

__all__ = ["INPUT", "Call", "Trace", "Use", "example_dims", "layouts_read", "trace"]

INPUT = ("input",)  # the example's values, as an activation source


class _Info:
    """What the trace knows of one tensor."""

    __slots__ = ("acts", "weights", "labels")

    def __init__(self, acts: frozenset = frozenset(), weights: tuple = (), labels: tuple = ()) -> None:
        self.acts = acts  # activation sources: INPUT, ("spikes", p), ("state", p), ("current", weight name)
        self.weights = weights  # ((weight name, dims), ...): the Parameters it is made of, dims as theirs
        self.labels = labels  # per dim: "batch", "time" or None


@dataclass(frozen=True)
class Use:
    """One synapse: an op consuming weight ``name``.

    ``outputs`` and ``inputs`` are the weight's dims indexing the output neurons and the inputs
    (None where the op's reading does not map to one dim of the Parameter).  ``reads`` are the
    sources of the activations it consumes; ``where`` names the op and the module it ran in.
    ``fan_in``/``fan_out``: the most non-zero entries into one output / out of one input, for a
    2-D weight."""

    name: str
    op: str
    outputs: int | None
    inputs: int | None
    groups: int
    gates: int
    reads: frozenset
    where: str
    fan_in: int | None = None
    fan_out: int | None = None

    def describe(self) -> str:
        dims = f"output neurons along dim {self.outputs}" if self.outputs is not None else "output neurons along no single dim"
        return f"{self.where} ({dims})"


@dataclass
class Call:
    """One call of a neuron module, in the population it continues or starts."""

    population: int
    neurons: int | None
    batch_found: bool  # whether the spikes' batch dim was followed from the example (else: dim 0 assumed)


@dataclass
class Trace:
    """What one forward computed: each weight's synapses, the populations (their modules, calls
    and what reached their spikes), the example's channels, and what the trace noticed."""

    uses: dict[str, list[Use]] = field(default_factory=dict)
    populations: list[str] = field(default_factory=list)  # the neuron module's dotted name, per population
    calls: list[Call] = field(default_factory=list)
    feeds: dict[int, frozenset] = field(default_factory=dict)  # population -> what reached its spikes
    channels: int = 0  # the example's channels per time step
    notes: list[str] = field(default_factory=list)

    def neurons(self, population: int) -> int | None:
        """The population's neurons: its first call's."""
        return next(c.neurons for c in self.calls if c.population == population)


def example_dims(example: Tensor, dims: str | None) -> str:
    """How the example's dims are read, one letter each: ``t`` time, ``b`` batch, any other
    letter a channel dim.  By default snnTorch's time-first convention: a 3-D example is
    ``"tbc"`` (time, batch, channels), a 2-D one ``"bc"``, a 1-D one ``"c"``, a 4-D or 5-D one
    ``"bccc"``/``"bcccc"`` (batch first, as images).

    Raises:
        ValueError: ``dims`` gives not one letter per dim, or more than one ``b`` or ``t``.
    """
    if dims is None:
        return {0: "", 1: "c", 2: "bc", 3: "tbc"}.get(example.dim(), "b" + "c" * (example.dim() - 1))
    if not isinstance(dims, str) or len(dims) != example.dim() or dims.count("b") > 1 or dims.count("t") > 1:
        raise ValueError(
            f"dims={dims!r} does not read an example of shape {tuple(example.shape)}: give one letter per dim, "
            "'t' time, 'b' batch, 'c' a channel dim (e.g. dims='btc')"
        )
    return dims


# --- how an op maps the dims of its first operand ------------------------------------------------

_SAME = {  # ops whose result has its first operand's dims, in order
    "contiguous", "clone", "detach", "detach_", "to", "float", "double", "half", "bfloat16", "type", "cpu", "cuda",
    "requires_grad_", "data", "type_as", "narrow", "chunk", "split", "tensor_split", "unsafe_chunk", "split_with_sizes",
    "unsafe_split", "resolve_conj", "resolve_neg", "roll", "flip", "cat", "concat", "concatenate",
}
_VIEWS = _SAME | {
    "t", "t_", "T", "mT", "mH", "adjoint", "transpose", "transpose_", "swapaxes", "swapdims", "permute", "movedim",
    "moveaxis", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "select", "unbind", "__getitem__", "expand",
    "expand_as", "broadcast_to", "view", "reshape", "view_as", "reshape_as", "flatten", "unflatten", "ravel",
}
_CREATES = {"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}
_IGNORED = {"shape", "size", "dim", "numel", "device", "dtype", "is_contiguous", "stride", "grad_fn", "requires_grad", "grad", "is_leaf"}


def _arg(args: Sequence, kwargs: Mapping, position: int, name: str, default: object = None) -> object:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else default


def _positive(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _regrouped(before: Sequence[int], after: Sequence[int]) -> tuple:
    """A reshape from ``before`` to ``after``: each new dim's old dim where exactly one old dim
    of the same size becomes exactly one new dim (dims of size 1 on both sides pair up in order:
    a batch of 1 stays the batch); None where dims merge or split, or a dim of size 1 is new."""
    result: list = [None] * len(after)
    i = j = 0
    while i < len(before) and j < len(after):
        if before[i] == 1 or after[j] == 1:  # a dim of size 1: kept, dropped or new
            if before[i] == 1 and after[j] == 1:
                result[j] = i
            i, j = i + (before[i] == 1), j + (after[j] == 1)
            continue
        i0, j0, a, b = i, j, before[i], after[j]
        i, j = i + 1, j + 1
        while a != b and (i < len(before) or j < len(after)):
            if (a < b and i < len(before)) or j >= len(after):
                a, i = a * before[i], i + 1
            else:
                b, j = b * after[j], j + 1
        if i - i0 == 1 and j - j0 == 1:
            result[j0] = i0
    return tuple(result)


def _indexed(index: object, rank: int) -> tuple | None:
    """``tensor[index]``: each result dim's dim (None for a new one); None for an index that
    gathers (a tensor or a list)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(item, (Tensor, list)) for item in items):
        return None
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    result: list = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            result += range(dim, dim + rank - used)
            dim += rank - used
        elif item is None:
            result.append(None)
        elif isinstance(item, slice):
            result.append(dim)
            dim += 1
        else:  # an integer: the dim goes
            dim += 1
    return tuple(result) + tuple(range(dim, rank))


def _aligned(source: Tensor, out: Tensor) -> tuple | None:
    """Broadcasting: each dim of ``out``'s dim in ``source``, aligned from the right (None where
    ``source`` has none, or stretches a dim of size 1)."""
    if source.dim() > out.dim():
        return None
    offset = out.dim() - source.dim()
    return (None,) * offset + tuple(d if source.shape[d] == out.shape[offset + d] else None for d in range(source.dim()))


def _through_view(name: str, args: Sequence, kwargs: Mapping, source: Tensor, out: Tensor) -> tuple | None:
    """For the view or shape op ``name`` taking ``source`` (its first operand) to ``out``: each
    dim of ``out``'s dim in ``source`` (None for a new or merged one)."""
    rank = source.dim()
    if name in _SAME:
        return tuple(range(rank)) if out.dim() == rank else None
    if name in ("t", "t_"):
        return (1, 0) if rank == 2 else tuple(range(rank))
    if name == "T":
        return tuple(reversed(range(rank)))
    if name in ("mT", "mH", "adjoint"):
        return (*range(rank - 2), rank - 1, rank - 2)
    if name in ("transpose", "transpose_", "swapaxes", "swapdims"):
        order = list(range(rank))
        a, b = _positive(_arg(args, kwargs, 1, "dim0"), rank), _positive(_arg(args, kwargs, 2, "dim1"), rank)
        order[a], order[b] = order[b], order[a]
        return tuple(order)
    if name == "permute":
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:] or kwargs["dims"]
        return tuple(_positive(d, rank) for d in order)
    if name in ("movedim", "moveaxis"):
        return _moved(_arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination"), rank)
    if name in ("unsqueeze", "unsqueeze_"):
        dim = _arg(args, kwargs, 1, "dim")
        order: list = list(range(rank))
        order.insert(dim + rank + 1 if dim < 0 else dim, None)
        return tuple(order)
    if name == "__getitem__":
        return _indexed(args[1], rank)
    if name in ("squeeze", "squeeze_"):
        dim = _arg(args, kwargs, 1, "dim")
        dims = range(rank) if dim is None else [dim] if isinstance(dim, int) else dim
        gone = {_positive(d, rank) for d in dims if source.shape[_positive(d, rank)] == 1}
        return tuple(d for d in range(rank) if d not in gone)
    if name in ("select", "unbind"):
        gone = _positive(_arg(args, kwargs, 1, "dim", 0), rank)
        return tuple(d for d in range(rank) if d != gone)
    if name in ("expand", "expand_as", "broadcast_to"):
        return _aligned(source, out)
    return _regrouped(tuple(source.shape), tuple(out.shape))  # view, reshape, flatten, unflatten, ravel


def _moved(source: int | Sequence[int], destination: int | Sequence[int], rank: int) -> tuple:
    sources = [_positive(d, rank) for d in ([source] if isinstance(source, int) else source)]
    destinations = [_positive(d, rank) for d in ([destination] if isinstance(destination, int) else destination)]
    order: list = [None] * rank
    for s, d in zip(sources, destinations):
        order[d] = s
    rest = iter(d for d in range(rank) if d not in sources)
    return tuple(next(rest) if o is None else o for o in order)


def _compose(dims: tuple, through: tuple) -> tuple:
    return tuple(dims[m] if m is not None and m < len(dims) else None for m in through)


# --- the synapses ---------------------------------------------------------------------------------

_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "addmm", "baddbmm", "addmv", "addbmm"}
_CONV = {"conv1d", "conv2d", "conv3d"}
_CONV_TRANSPOSE = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_RNN = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_CELL = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1, "rnn_relu_cell": 1}
_SYNAPSES = {"linear", "bilinear", "einsum"} | _MATMUL | _CONV | _CONV_TRANSPOSE
_PRODUCTS = {"mul", "__mul__", "__rmul__", "mul_"}


def _fans(op: str, weight: Tensor, out_dim: int | None, in_dim: int | None, groups: int) -> tuple[int | None, int | None]:
    """The most non-zero entries into one output neuron, and out of one input (a channel at one
    kernel offset, for a convolution), as the op reads ``weight``; None where it cannot tell."""
    if weight.numel() == 0:
        return 0, 0
    nonzero = weight.detach() != 0
    if op == "conv":  # (out, in / groups, *kernel): group g's outputs read its inputs
        per_group = nonzero.reshape(groups, weight.shape[0] // groups, -1)
        return int(per_group.sum(2).max()), int(per_group.sum(1).max())
    if op == "conv_transpose":  # (in, out / groups, *kernel): input i of group g feeds the group's outputs
        per_group = nonzero.reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        return int(per_group.sum((1, 3)).max()), int(per_group.sum(2).max())
    if weight.dim() != 2 or out_dim is None or in_dim is None:
        return None, None
    return int(nonzero.sum(in_dim).max()), int(nonzero.sum(out_dim).max())


class _Tracer(TorchFunctionMode):
    """Follows the tensors of one forward (see the module docstring)."""

    def __init__(self, names: Mapping[int, str], steps: int) -> None:
        super().__init__()
        self.infos = WeakTensorKeyDictionary()
        self.names = names  # id(Parameter) -> the weight's name
        self.steps = steps  # the example's time steps (0: no time dim)
        self.result = Trace()
        self.where: list[str] = []  # the modules running, innermost last
        self.neuron_calls: list[int] = []  # the populations whose call is running
        self.held: list[Tensor] = []  # every tensor the trace tagged, alive until it ends

    # tensors ---------------------------------------------------------------------------------------

    def info(self, tensor: object) -> _Info | None:
        if not isinstance(tensor, Tensor):
            return None
        found = self.infos.get(tensor)
        if found is None and id(tensor) in self.names:
            found = _Info(weights=((self.names[id(tensor)], tuple(range(tensor.dim()))),))
            self.tag(tensor, found)
        return found

    def tag(self, tensor: Tensor, info: _Info) -> None:
        self.infos[tensor] = info
        self.held.append(tensor)

    def acts(self, value: object) -> frozenset:
        found = [self.info(t) for t in pytree.tree_leaves(value) if isinstance(t, Tensor)]
        return frozenset().union(*(i.acts for i in found if i is not None))

    def here(self, what: str) -> str:
        module = self.where[-1] if self.where else ""
        return f"{what} in {module or 'the model'}"

    # the mode --------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":
            name = getattr(getattr(func, "__self__", None), "__name__", "")
        if name not in _IGNORED:
            try:
                self.record(name, args, kwargs, out)
            except Exception as error:  # noqa: BLE001 - said in the notes; the user's forward goes on
                note = f"the trace could not follow {name} ({type(error).__name__}: {error}); what it computes is not traced"
                if note not in self.result.notes:
                    self.result.notes.append(note)
        return out

    def record(self, name: str, args: tuple, kwargs: dict, out: object) -> None:
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
        if not outs:
            return
        if name in _SYNAPSES and self.synapse(name, args, kwargs, outs):
            return
        if name in _RNN or name in _CELL:
            self.recurrent(name, args, outs)
            return
        operands = [args[0]] if name in _VIEWS and args and isinstance(args[0], Tensor) else pytree.tree_leaves((args, kwargs))
        known = [(t, i) for t in operands if (i := self.info(t)) is not None]
        if not known:
            if self.neuron_calls and not any(isinstance(t, Tensor) for t in pytree.tree_leaves((args, kwargs))):
                for o in outs:  # a new tensor made inside a neuron (torch.zeros): its initial state
                    self.tag(o, _Info(frozenset({("own", self.neuron_calls[-1])}), (), (None,) * o.dim()))
            return
        if name == "stack":
            self.stacked(args, kwargs, known, outs[0])
            return
        if name in _CREATES:  # new values: inside a neuron, its own state (an initial membrane)
            acts = frozenset({("own", self.neuron_calls[-1])}) if self.neuron_calls else frozenset()
        else:
            acts = frozenset().union(*(i.acts for _, i in known))
        gains = [i for _, i in known if i.weights and not i.acts]
        if acts and gains and name in _PRODUCTS and not self.neuron_calls:
            self.gain(gains, acts, known, outs)
            return
        shapes = [t.shape for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        try:
            common = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            common = None
        for o in outs:
            broadcast = tuple(o.shape) == common
            weights: dict = {}
            labels: list = [None] * o.dim()
            for t, i in known:
                through = _through_view(name, args, kwargs, t, o) if name in _VIEWS else _aligned(t, o) if broadcast else None
                through = through or (None,) * o.dim()
                if not acts:
                    for weight, dims in i.weights:
                        weights.setdefault(weight, _compose(dims, through))
                for d, label in enumerate(_compose(i.labels, through)):
                    labels[d] = labels[d] or label
            self.tag(o, _Info(acts, tuple(weights.items()), tuple(labels)))

    def stacked(self, args: tuple, kwargs: dict, known: list, out: Tensor) -> None:
        """``torch.stack``: a new dim; stacking as many tensors as the example has time steps makes
        the time dim (Norse's sequence modules stack their steps)."""
        sequence = _arg(args, kwargs, 0, "tensors")
        dim = _positive(_arg(args, kwargs, 1, "dim", 0), out.dim())
        first = self.info(sequence[0]) if len(sequence) else None
        labels = list(first.labels) if first is not None and len(first.labels) == out.dim() - 1 else [None] * (out.dim() - 1)
        labels.insert(dim, "time" if self.steps and len(sequence) == self.steps else None)
        self.tag(out, _Info(frozenset().union(*(i.acts for _, i in known)), (), tuple(labels)))

    def gain(self, gains: list, acts: frozenset, known: list, outs: list) -> None:
        """An activation times a weight, elementwise, outside a neuron: one-to-one synapses."""
        names = [w for info in gains for w, _ in info.weights]
        for name in names:
            self.used(Use(name, "gain", None, None, 1, 1, acts, self.here("x * weight"), 1, 1))
        labels = next((i.labels for _, i in known if i.acts), ())
        for o in outs:
            self.tag(o, _Info(frozenset(("current", n) for n in names), (), labels if len(labels) == o.dim() else (None,) * o.dim()))

    def inside(self, reads: frozenset) -> frozenset:
        """What a synapse inside a neuron's call reads: what it is given; or, where it reads the
        neuron's own state (its membrane or spikes: what the state it is given or keeps, or makes
        afresh, became), the population itself."""
        if self.neuron_calls:
            population = self.neuron_calls[-1]
            if not reads or ("own", population) in reads:  # through the neuron's dynamics: it reads the neuron
                return frozenset({("state", population)})
        return reads

    def used(self, use: Use) -> None:
        self.result.uses.setdefault(use.name, []).append(use)

    def synapse(self, name: str, args: tuple, kwargs: dict, outs: list) -> bool:
        """Record a synaptic op: one weight and activations; False when it is not one."""
        if name == "einsum":
            operands = list(args[1][0] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])
        elif name in ("addmm", "baddbmm", "addmv", "addbmm"):
            operands = [args[1], args[2]]
        elif name == "__rmatmul__":
            operands = [args[1], args[0]]
        elif name == "bilinear":
            operands = [args[0], args[1], _arg(args, kwargs, 2, "weight")]
        elif name in _MATMUL:
            operands = [args[0], _arg(args, kwargs, 1, "other", _arg(args, kwargs, 1, "mat2", _arg(args, kwargs, 1, "vec")))]
        else:
            operands = [args[0], _arg(args, kwargs, 1, "weight")]
        infos = [self.info(t) for t in operands]
        weights = [k for k, i in enumerate(infos) if i is not None and i.weights and not i.acts]
        activations = [k for k, t in enumerate(operands) if isinstance(t, Tensor) and k not in weights]
        if len(weights) != 1 or not activations:
            return False
        infos = [i if i is not None else _Info(labels=(None,) * t.dim()) if isinstance(t, Tensor) else None for t, i in zip(operands, infos)]
        k = weights[0]
        weight, info = operands[k], infos[k]
        act, act_labels = operands[activations[0]], infos[activations[0]].labels
        reads = self.inside(frozenset().union(*(infos[a].acts for a in activations)))
        groups, out_dim, in_dim, op = 1, None, None, name
        if name == "linear":
            out_dim, in_dim, labels, what = 0, 1, act_labels[:-1] + (None,), "F.linear(x, weight)"
        elif name == "bilinear":
            out_dim, labels, what = 0, act_labels[:-1] + (None,), "F.bilinear(x1, x2, weight)"
        elif name in _CONV or name in _CONV_TRANSPOSE:
            transposed = name in _CONV_TRANSPOSE
            groups = int(_arg(args, kwargs, 6, "groups", 1))
            out_dim, in_dim = (1, 0) if transposed else (0, 1)
            batched = act.dim() == weight.dim()
            labels = ((act_labels[0] if act_labels else None,) if batched else ()) + (None,) * (outs[0].dim() - batched)
            op, what = ("conv_transpose" if transposed else "conv"), f"{name}(x, weight)"
        elif name == "einsum":
            reading = self.einsum(args[0], operands, infos, k, activations)
            if reading is None:
                return False
            out_dim, in_dim, labels = reading
            what = f"einsum({args[0]!r})"
        elif weight.dim() < 2:
            return False
        elif k == len(operands) - 1:  # x @ W: W is [in, out]
            out_dim, in_dim, op, what = weight.dim() - 1, weight.dim() - 2, "matmul", "x @ weight"
            labels = act_labels[:-1] + (None,) if act.dim() >= 2 else (None,)
        else:  # W @ x: W is [out, in]
            out_dim, in_dim, op, what = weight.dim() - 2, weight.dim() - 1, "matmul", "weight @ x"
            labels = (None,) * (outs[0].dim() - 1) + (act_labels[-1] if act.dim() >= 2 and act_labels else None,)
        fan_in, fan_out = _fans(op, weight, out_dim, in_dim, groups)
        for weight_name, dims in info.weights:
            mapped = [dims[d] if d is not None and d < len(dims) else None for d in (out_dim, in_dim)]
            self.used(Use(weight_name, op, *mapped, groups, 1, reads, self.here(what), fan_in, fan_out))
        current = frozenset(("current", w) for w, _ in info.weights)
        for o in outs:
            fitted = tuple(labels)[: o.dim()] + (None,) * max(0, o.dim() - len(labels))
            self.tag(o, _Info(current, (), fitted))
        return True

    def einsum(self, equation: str, operands: list, infos: list, k: int, activations: list) -> tuple | None:
        """An einsum's reading of operand ``k``: the letter it shares only with the output
        indexes the output neurons, the one it shares only with the activations the inputs."""
        equation = equation.replace(" ", "")
        if "..." in equation or not re.fullmatch(r"[A-Za-z,]+(->[A-Za-z]*)?", equation):
            return None
        left, arrow, output = equation.partition("->")
        subscripts = left.split(",")
        if not arrow:
            letters = "".join(subscripts)
            output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
        mine = subscripts[k]
        theirs = set("".join(subscripts[a] for a in activations))
        outs = [c for c in mine if c in output and c not in theirs]
        ins = [c for c in mine if c in theirs and c not in output]
        act_subscripts, act_labels = subscripts[activations[0]], infos[activations[0]].labels
        labels = tuple(
            act_labels[act_subscripts.index(c)] if c in act_subscripts and act_subscripts.index(c) < len(act_labels) else None
            for c in output
        )
        return (mine.index(outs[0]) if len(outs) == 1 else None), (mine.index(ins[0]) if len(ins) == 1 else None), labels

    def recurrent(self, name: str, args: tuple, outs: list) -> None:
        """torch's RNN ops and cells: weight_ih reads the input, weight_hh the hidden state (a
        cell's, given); each is read by rows (torch's [gates x hidden, in]), gates by op."""
        gates = _RNN.get(name) or _CELL[name]
        if name in _CELL:
            x, hx, *params = args
            h = hx[0] if isinstance(hx, (tuple, list)) else hx
            readers = [(params[0], self.inside(self.acts(x)), gates), (params[1], self.inside(self.acts(h)), gates)]
        else:  # (input, [batch_sizes,] hx, params, ...): an LSTM's projection weight_hr has no gates
            lists = [a for a in args[1:] if isinstance(a, (list, tuple)) and a and all(isinstance(p, Tensor) for p in a)]
            params = next((a for a in lists if a[0].dim() == 2), [])
            hx = next((a for a in args[1:] if isinstance(a, Tensor) and a.dim() >= 2 or (isinstance(a, (list, tuple)) and a is not params and a)), None)
            hidden = (hx[-1] if isinstance(hx, (list, tuple)) else hx).shape[-1] if hx is not None else None
            matrices = [p for p in params if p.dim() == 2]
            readers = [
                (p, self.acts(args[0]) if i == 0 else frozenset(), gates if p.shape[0] == gates * hidden else 1)
                for i, p in enumerate(matrices)
            ]
        current = set()
        for weight, reads, g in readers:
            info = self.info(weight)
            for weight_name, dims in info.weights if info is not None else ():
                rows = dims[:2] == (0, 1)
                self.used(Use(weight_name, name, 0 if rows else None, 1 if rows else None, 1, g, reads, self.here(f"torch.{name}")))
                current.add(("current", weight_name))
        x_info = self.info(args[0])
        for o in outs:
            labels = x_info.labels[:-1] + (None,) if x_info is not None and len(x_info.labels) == o.dim() else (None,) * o.dim()
            self.tag(o, _Info(frozenset(current), (), labels))

    # neurons ---------------------------------------------------------------------------------------

    def neuron_started(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A neuron module's call: it continues the population whose state it is given (or, given
        none, keeps in its buffers), else it starts a population."""
        given = [t for t in pytree.tree_leaves((args[1:], kwargs)) if isinstance(t, Tensor)]
        kept = [module._buffers[k] for k in module._non_persistent_buffers_set if isinstance(module._buffers.get(k), Tensor)]
        tokens = self.acts(given if given else kept)
        mine = sorted(p for kind, p, *_ in (t for t in tokens if t[0] in ("state", "spikes")) if self.result.populations[p] == path)
        if mine:
            population = mine[0]
        else:
            population = len(self.result.populations)
            self.result.populations.append(path)
        self.neuron_calls.append(population)
        own = ("own", population)  # the state it is given or keeps is the neuron's own, whatever its values
        for t in given if given else kept:
            info = self.info(t)
            self.tag(t, _Info(info.acts | {own}, info.weights, info.labels) if info is not None else _Info(frozenset({own}), (), (None,) * t.dim()))

    def neuron_ended(self, path: str, module: nn.Module, output: object) -> None:
        population = self.neuron_calls.pop()
        leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]
        if not leaves:
            self.result.calls.append(Call(population, None, False))
            return
        spikes = leaves[0]
        reached = frozenset().union(*(i.acts for t in leaves if (i := self.info(t)) is not None))
        self.result.feeds[population] = self.result.feeds.get(population, frozenset()) | reached
        labels = self.info(spikes).labels if self.info(spikes) is not None else ()
        if len(labels) != spikes.dim() or "batch" not in labels:
            labels, found = ("batch",) + (None,) * (spikes.dim() - 1) if spikes.dim() > 1 else (None,) * spikes.dim(), False
        else:
            found = True
        neurons = math.prod(size for size, label in zip(spikes.shape, labels) if label not in ("batch", "time"))
        self.result.calls.append(Call(population, neurons, found))
        self.tag(spikes, _Info(frozenset({("spikes", population)}), (), tuple(labels)))
        state_token = frozenset({("state", population)})
        for t in leaves[1:]:
            if t is not spikes:
                self.tag(t, _Info(state_token, (), self.info(t).labels if self.info(t) is not None else ()))
        for key in module._non_persistent_buffers_set:
            buffer = module._buffers.get(key)
            if isinstance(buffer, Tensor) and buffer is not spikes:
                self.tag(buffer, _Info(state_token, (), ()))


def parameter_names(model: nn.Module) -> dict[int, str]:
    """``id(Parameter) -> name`` for every Parameter of ``model``, by the name users write: a
    parametrized weight's stored tensors (``original``, ``original0``...) by the weight's name."""
    names: dict[int, str] = {}
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        for local, value in module._parameters.items():
            if value is not None:
                names.setdefault(id(value), prefix + local)
        chains = module._modules.get("parametrizations") if isinstance(module._modules.get("parametrizations"), nn.ModuleDict) else None
        for tensor_name, chain in (chains.items() if chains is not None else ()):
            for value in chain._parameters.values():
                if value is not None:
                    names[id(value)] = prefix + tensor_name
    return names


@contextlib.contextmanager
def _unchanged(model: nn.Module) -> Iterator[None]:
    """Afterwards ``model`` is exactly as before: its parameters, buffers and attributes (training
    modes, tensors a forward stored), the contents of its dicts (submodules and hooks a forward may
    add), and torch's random state."""
    modules = list(model.modules())
    saved = state.snapshot(modules, attributes=True)
    contents = [(value, dict(value)) for module in modules for value in vars(module).values() if isinstance(value, dict)]
    rng = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        for value, items in contents:
            value.clear()
            value.update(items)
        state.restore(saved)


def trace(model: nn.Module, example: Tensor, neurons: Mapping[str, nn.Module], dims: str | None = None) -> Trace:
    """Run ``model(example)`` once, under ``torch.no_grad()``, and return what it computed.

    ``neurons`` are the neuron modules by dotted name (each call of one is a population's step);
    ``dims`` reads the example's dims (:func:`example_dims`).  Afterwards the model is exactly as
    before (see :func:`_unchanged`), and nothing has gradients.

    Raises:
        ValueError: ``model`` holds a lazy module not initialized yet (run one forward first).
    """
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(f"{lazy[0]} is not initialized yet (a lazy module): run one forward pass of the model first, then trace it")
    letters = example_dims(example, dims)
    steps = example.shape[letters.index("t")] if "t" in letters else 0
    tracer = _Tracer(parameter_names(model), steps)
    labels = tuple({"b": "batch", "t": "time"}.get(letter) for letter in letters)
    tracer.tag(example, _Info(frozenset({INPUT}), (), labels))
    tracer.result.channels = math.prod(size for size, letter in zip(example.shape, letters) if letter not in "bt")
    with _unchanged(model), tracing(model), torch.no_grad(), contextlib.ExitStack() as hooks:
        for name, module in model.named_modules():
            hooks.enter_context(_watched(tracer, name, module, neurons.get(name) is module))
        with tracer:
            model(example)
    return tracer.result


@contextlib.contextmanager
def _watched(tracer: _Tracer, name: str, module: nn.Module, neuron: bool) -> Iterator[None]:
    """Hooks that tell the tracer which module runs, and a neuron's calls."""

    def started(module, args, kwargs):
        tracer.where.append(name)
        if neuron:
            tracer.neuron_started(name, module, args, kwargs)

    def ended(module, args, kwargs, output):
        if neuron and tracer.neuron_calls:
            tracer.neuron_ended(name, module, output)
        if tracer.where:
            tracer.where.pop()

    handles = [
        module.register_forward_pre_hook(started, with_kwargs=True),
        module.register_forward_hook(ended, with_kwargs=True, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_RNN_OPS = set(_RNN) | set(_CELL)


def _layout_of_use(use: Use, dims: int) -> Layout | None:
    """The layout a synapse reads its weight (of ``dims`` dims) with; None when its output
    neurons do not run along one dim of the Parameter, the way a layout can say."""
    reading = (use.outputs, use.inputs)
    if use.op == "conv":
        return Layout(groups=use.groups) if reading == (0, 1) else None
    if use.op == "conv_transpose":
        return Layout(groups=use.groups, transposed=True) if reading == (1, 0) else None
    if use.op in _RNN_OPS:
        return Layout(gates=use.gates) if use.outputs == 0 else None
    if dims == 2 and reading == (1, 0):
        return Layout(inputs_first=True)
    return Layout() if use.outputs == 0 else None


def layouts_read(traced: Trace, dims: Mapping[str, int]) -> dict[str, tuple[Layout | None, Use]]:
    """Each weight the forward used as a synapse (of 2 or more dims, by ``dims``), with the layout
    its uses read it with and one of those uses; None where no use says which dim indexes the
    output neurons.  A gain (an elementwise product) is no matrix: a weight used only so is left out.

    Raises:
        ValueError: a weight read in two ways (``x @ W`` and ``F.linear(x, W)``), naming both uses.
    """
    found: dict[str, tuple[Layout | None, Use]] = {}
    for name, uses in traced.uses.items():
        if dims.get(name, 0) < 2:
            continue
        readings: dict[Layout | None, Use] = {}
        for use in uses:
            if use.op != "gain":
                readings.setdefault(_layout_of_use(use, dims[name]), use)
        known = {layout: use for layout, use in readings.items() if layout is not None}
        if len(known) > 1:
            (a, use_a), (b, use_b) = list(known.items())[:2]
            raise ValueError(
                f"{name} is read two ways: {use_a.describe()} and {use_b.describe()}; one weight is one matrix on the "
                "chip: use it one way, or give each use a weight of its own"
            )
        if readings:
            found[name] = next(iter(known.items())) if known else (None, next(iter(readings.values())))
    return found
