"""What a network computes, read from one traced forward.

:func:`trace` runs ``model(example)`` once (twice when the model keeps activations from one call to
the next in its own buffers or attributes), under ``torch.no_grad()``, inside a
:class:`~torch.overrides.TorchFunctionMode` that follows every tensor the forward makes:

* **where its values come from**: the example's channels, a population's spikes or membrane
  state, a synapse's current (its *activation* sources); or the Parameters it is made of, through
  views and elementwise ops such as a mask ``weight * diagonal`` or a parametrization's output (a
  *weight*), and which of the Parameter's dims each of its dims is;
* **which of its dims are the example's batch and time**;
* on the way from the input to the first neurons, **which input channels reach each of its
  elements**, so that the front end's one-to-one rule is checked on what the network computes.

An op that consumes a weight and an activation is a **synapse** (a :class:`Use`): ``F.linear``,
``matmul`` / ``@`` / ``mm`` / ``bmm``, ``einsum``, convolutions and transposed convolutions,
torch's RNN ops and cells, ``F.bilinear``, an elementwise product (a gain), and any other op that
mixes an activation with a tensor that is not one (``tensordot``, ``inner``, ``multi_dot``...,
read without an orientation); an op that is not elementwise over activations, mixing them across
neurons (a sum over them, a softmax, a pooling), is a fixed synapse of its own.  The op says which of the weight's dims indexes the output neurons
and which the inputs: ``x @ W`` reads ``W`` as ``[in, out]``, the chip vendor's convention;
``F.linear(x, W)`` as ``[out, in]``, torch's.  A buffer or a tensor made in the forward is a
synapse too, fixed: it connects populations, though nwave_param does not train it.

A **population** is one chain of membrane state of a neuron module.  A call continues the
population whose earlier call made the state it is given (or, given none, the state it keeps: its
buffers and tensor attributes, as snnTorch's neurons keep theirs); a call given state no call of
the module made, such as one module applied to two layers, starts a population, and so does a
call whose spikes have another size (snnTorch starts afresh then).  Its
neurons are every element of its spikes but the batch and the time.  What reaches a call's spikes
(synapses' currents, the input, other populations' spikes) feeds its population.

What the trace cannot see: a weight used through a custom autograd Function whose forward calls
no torch function, or through a C extension, is no synapse to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakTensorKeyDictionary

from nwave_param.core import state
from nwave_param.errors import one_line
from nwave_param.layout import Layout
from nwave_param.core.neurons import within
from nwave_param.core.passes import tracing
from nwave_param.sharing import same_bits

__all__ = ["INPUT", "Call", "Trace", "Use", "example_dims", "layouts_read", "trace"]

INPUT = ("input",)  # the example's values, as an activation source
UNKNOWN = "unknown"  # channels that reach a tensor in a way the trace cannot follow
MADE = "a tensor made in the forward"


class _Info:
    """What the trace knows of one tensor."""

    __slots__ = ("acts", "weights", "labels", "channels")

    def __init__(self, acts: frozenset = frozenset(), weights: tuple = (), labels: tuple = (), channels: object = None) -> None:
        self.acts = acts  # activation sources: INPUT, ("spikes", p), ("state", p), ("own", p), ("current", use)
        self.weights = weights  # ((weight name, dims), ...): the Parameters it is made of, dims as theirs
        self.labels = labels  # per dim: "batch", "time" or None
        self.channels = channels  # None, UNKNOWN, or (dim or None, (input channels per index along dim, ...))


@dataclass(frozen=True)
class Use:
    """One synapse: an op consuming weight ``name`` (a Parameter's name; for a fixed synapse, a
    buffer's or "a tensor made in the forward", with ``parameter`` False).

    ``outputs`` and ``inputs`` are the weight's dims indexing the output neurons and the inputs
    (None where the op's reading does not map to one dim of the Parameter); ``rows`` is how many
    output neurons the op reads of it (fewer than the Parameter holds when the forward splits
    it).  ``reads`` are the sources of the activations it consumes; ``where`` names the op and the
    module it ran in; ``index`` is its place in :attr:`Trace.all_uses`, which its current names."""

    index: int
    name: str
    op: str
    outputs: int | None
    inputs: int | None
    groups: int
    gates: int
    reads: frozenset
    where: str
    rows: int | None = None
    parameter: bool = True

    def describe(self) -> str:
        dims = f"output neurons along dim {self.outputs}" if self.outputs is not None else "output neurons along no single dim"
        return f"{self.where} ({dims})"


@dataclass
class Call:
    """One call of a neuron module, in the population it continues or starts."""

    population: int
    neurons: int | None
    batch_found: bool  # whether the spikes' batch dim was followed from the example (else dim 0 was taken)


@dataclass
class Trace:
    """What one forward computed: the synapses (each Parameter's, and all of them in order), the
    populations (their modules, calls and what reached their spikes), how the input channels reach
    each population the input reaches before any other, and what the trace noticed."""

    uses: dict[str, list[Use]] = field(default_factory=dict)  # a Parameter's name -> its synapses
    all_uses: list[Use] = field(default_factory=list)
    populations: list[str] = field(default_factory=list)  # the neuron module's dotted name, per population
    modules: list[nn.Module] = field(default_factory=list)  # the neuron module, per population
    calls: list[Call] = field(default_factory=list)
    feeds: dict[int, frozenset] = field(default_factory=dict)  # population -> what reached its spikes
    fans: dict[int, tuple[int, int] | None] = field(default_factory=dict)  # front population -> (fan-in, fan-out) from the input; None: not known
    channels: int = 0  # the example's channels per time step
    notes: list[str] = field(default_factory=list)

    def neurons(self, population: int) -> int | None:
        """The population's neurons: its first call's."""
        return next(c.neurons for c in self.calls if c.population == population)


def example_dims(example: Tensor, dims: str | None) -> str:
    """How the example's dims are read, one letter each: ``t`` time, ``b`` batch, any other
    letter a channel dim.  By default snnTorch's time-first convention: a 3-D example is
    ``"tbc"`` (time, batch, channels), a 2-D one ``"bc"``, a 1-D one ``"c"``, a 4-D one
    ``"bccc"`` (a batch of images), a 5-D one ``"tbccc"`` (time, batch, channels, height, width,
    as snnTorch and tonic give event frames).

    Raises:
        ValueError: ``dims`` gives not one letter per dim, or more than one ``b`` or ``t``.
    """
    if dims is None:
        return {0: "", 1: "c", 2: "bc", 3: "tbc", 5: "tbccc"}.get(example.dim(), "b" + "c" * (example.dim() - 1))
    if not isinstance(dims, str) or len(dims) != example.dim() or dims.count("b") > 1 or dims.count("t") > 1:
        raise ValueError(
            f"dims={dims!r} does not read an example of shape {tuple(example.shape)}: give one letter per dim, "
            "'t' time, 'b' batch, 'c' a channel dim (e.g. dims='btc')"
        )
    return dims


# --- how an op maps the dims of its operands -----------------------------------------------------

_SAME = {  # ops whose result has its first operand's dims, in order
    "contiguous", "clone", "detach", "detach_", "to", "float", "double", "half", "bfloat16", "type", "cpu", "cuda",
    "requires_grad_", "data", "type_as", "resolve_conj", "resolve_neg",
}
_VIEWS = _SAME | {
    "t", "t_", "T", "mT", "mH", "adjoint", "transpose", "transpose_", "swapaxes", "swapdims", "permute", "movedim",
    "moveaxis", "unsqueeze", "unsqueeze_", "squeeze", "squeeze_", "expand", "expand_as", "broadcast_to", "view",
    "reshape", "view_as", "reshape_as", "flatten", "unflatten", "ravel",
}
# ops that move or pick elements: their channels are read by running them on an index probe
_PICKS = {
    "__getitem__", "select", "narrow", "index_select", "gather", "take_along_dim", "flip", "roll", "cat", "concat",
    "concatenate", "stack", "split", "chunk", "tensor_split", "unsafe_chunk", "split_with_sizes", "unsafe_split",
    "unbind", "repeat", "repeat_interleave", "tile",
}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "norm", "logsumexp", "std", "var", "nansum", "nanmean"}
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


def _aligned(source: Tensor, out: Tensor) -> tuple | None:
    """Broadcasting: each dim of ``out``'s dim in ``source``, aligned from the right (None where
    ``source`` has none, or stretches a dim of size 1)."""
    if source.dim() > out.dim():
        return None
    offset = out.dim() - source.dim()
    return (None,) * offset + tuple(d if source.shape[d] == out.shape[offset + d] else None for d in range(source.dim()))


def _moved(source: int | Sequence[int], destination: int | Sequence[int], rank: int) -> tuple:
    sources = [_positive(d, rank) for d in ([source] if isinstance(source, int) else source)]
    destinations = [_positive(d, rank) for d in ([destination] if isinstance(destination, int) else destination)]
    order: list = [None] * rank
    for s, d in zip(sources, destinations):
        order[d] = s
    rest = iter(d for d in range(rank) if d not in sources)
    return tuple(next(rest) if o is None else o for o in order)


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
    if name in ("squeeze", "squeeze_"):
        dim = _arg(args, kwargs, 1, "dim")
        dims = range(rank) if dim is None else [dim] if isinstance(dim, int) else dim
        gone = {_positive(d, rank) for d in dims if source.shape[_positive(d, rank)] == 1}
        return tuple(d for d in range(rank) if d not in gone)
    if name in ("expand", "expand_as", "broadcast_to"):
        return _aligned(source, out)
    return _regrouped(tuple(source.shape), tuple(out.shape))  # view, reshape, flatten, unflatten, ravel


def _through_pick(name: str, args: Sequence, kwargs: Mapping, source: Tensor, out: Tensor) -> tuple | None:
    """For an op that picks or moves ``source``'s elements: each dim of ``out``'s dim in
    ``source`` where the dims correspond (ranks equal, or one dim gone or added)."""
    if name in ("select", "unbind"):
        gone = _positive(_arg(args, kwargs, 1, "dim", 0), source.dim())
        return tuple(d for d in range(source.dim()) if d != gone)
    if name == "stack":
        dim = _positive(_arg(args, kwargs, 1, "dim", 0), out.dim())
        order: list = list(range(source.dim()))
        order.insert(dim, None)
        return tuple(order)
    if name == "__getitem__":
        return _indexed(args[1], source.dim())
    return tuple(range(source.dim())) if out.dim() == source.dim() else None


def _indexed(index: object, rank: int) -> tuple | None:
    """``tensor[index]``: each result dim's dim (None for a new one); None for an index that gathers."""
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


def _compose(dims: tuple, through: tuple) -> tuple:
    return tuple(dims[m] if m is not None and m < len(dims) else None for m in through)


# --- channels: which input channels reach each element, on the way to the first neurons ------------


def _channel_probe(tensor: Tensor, channels: tuple, offset: int) -> Tensor:
    """``tensor``'s shape, each element holding the index (plus ``offset``) of its position along
    the channels' dim, as float64: what a picking op moves shows where each position went."""
    dim, _ = channels
    if dim is None:
        return torch.full(tensor.shape, float(offset), dtype=torch.float64)
    shape = [1] * tensor.dim()
    shape[dim] = tensor.shape[dim]
    return (torch.arange(tensor.shape[dim], dtype=torch.float64) + offset).view(shape).expand(tensor.shape).clone()


def _decoded(probe: Tensor, table: list[frozenset]) -> object:
    """The channels of an op's result from its probe: each position's channels from ``table``
    (-1: none), read as one dim along which they vary (and are constant along the others)."""
    if probe.numel() == 0:
        return (None, (frozenset(),))
    distinct: dict[frozenset, int] = {}
    sets = [frozenset(), *table]  # position -1 holds no channel
    lookup = torch.tensor([distinct.setdefault(s, len(distinct)) for s in sets])
    ids = lookup[(probe + 1).long()]  # equal sets, equal ids: the slices of a stack carry the same channels
    by_id = list(distinct)
    varying = [d for d in range(ids.dim()) if ids.shape[d] > 1 and not bool((ids == ids.narrow(d, 0, 1)).all())]
    if not varying:
        return (None, (by_id[int(ids.reshape(-1)[0])],))
    if len(varying) > 1:
        return UNKNOWN
    d = varying[0]
    line = ids.movedim(d, -1).reshape(-1, ids.shape[d])
    if not bool((line == line[:1]).all()):
        return UNKNOWN
    return (d, tuple(by_id[int(v)] for v in line[0].tolist()))


def _merged(channels: object) -> object:
    """All the channels of ``channels`` reaching every element (a reduction over their dim)."""
    if channels is None or channels == UNKNOWN:
        return channels
    return (None, (frozenset().union(*channels[1]),))


def _fan(channels: object, neurons_dim: int | None, neurons: int) -> tuple[int, int] | None:
    """``(fan-in, fan-out)``: the most input channels reaching one neuron, and the most neurons one
    channel reaches; None when the channels are not known."""
    if channels is None or channels == UNKNOWN:
        return None
    dim, sets = channels
    if dim is None:
        sets = sets * neurons  # every neuron gets them all
    elif dim != neurons_dim:
        return None
    fan_in = max((len(s) for s in sets), default=0)
    counts: dict[int, int] = {}
    for s in sets:
        for c in s:
            counts[c] = counts.get(c, 0) + 1
    return fan_in, max(counts.values(), default=0)


# --- the synapses ---------------------------------------------------------------------------------

_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "mv", "addmm", "baddbmm", "addmv", "addbmm"}
_CONV = {"conv1d", "conv2d", "conv3d"}
_CONV_TRANSPOSE = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_RNN = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
_CELL = {"lstm_cell": 4, "gru_cell": 3, "rnn_tanh_cell": 1, "rnn_relu_cell": 1}
_SYNAPSES = {"linear", "bilinear", "einsum"} | _MATMUL | _CONV | _CONV_TRANSPOSE
_PRODUCTS = {"mul", "__mul__", "__rmul__", "mul_", "multiply"}
_ALSO_ELEMENTWISE = {"dropout", "dropout_", "alpha_dropout", "feature_dropout", "bernoulli", "copy_", "zero_", "fill_", "masked_fill_"}
_RENAMED = {"truediv": "div", "floordiv": "floor_divide", "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor", "invert": "bitwise_not",
            "multiply": "mul", "subtract": "sub", "divide": "div", "true_divide": "div"}
MIXED = "a mixing op over activations"  # a fixed synapse with no tensor of weights (a sum over neurons, a softmax, a pooling)


@functools.cache
def _elementwise(name: str) -> bool:
    """Whether torch's op ``name`` computes each output element from the same element of its
    operands: an aten op tagged pointwise (``mul``, ``__rmul__``, ``sigmoid_``...), or dropout."""
    if name in _ALSO_ELEMENTWISE:
        return True
    base = name[3:-2] if name.startswith("__r") and name.endswith("__") else name.strip("_")
    packet = getattr(torch.ops.aten, _RENAMED.get(base, base), None)
    overloads = packet.overloads() if isinstance(packet, torch._ops.OpOverloadPacket) else ()
    return any(torch.Tag.pointwise in getattr(packet, overload).tags for overload in overloads)


class _Tracer(TorchFunctionMode):
    """Follows the tensors of one forward (see the module docstring)."""

    def __init__(self, names: Mapping[int, str], buffers: Mapping[int, str], steps: int) -> None:
        super().__init__()
        self.infos = WeakTensorKeyDictionary()
        self.names = names  # id(Parameter) -> the weight's name
        self.buffers = buffers  # id(buffer) -> its name
        self.steps = steps  # the example's time steps (0: no time dim)
        self.result = Trace()
        self.where: list[str] = []  # the modules running, innermost last
        self.neuron_calls: list[int] = []  # the populations whose call is running
        self.held: list[Tensor] = []  # every tensor the trace tagged, alive until it ends
        self.func = None  # the op being recorded, as the forward called it

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

    def note(self, text: str) -> None:
        if text not in self.result.notes:
            self.result.notes.append(text)

    # the mode --------------------------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name in ("__get__", "__set__"):
            attribute = getattr(getattr(func, "__self__", None), "__name__", "")
            name = attribute if name == "__get__" else f"{attribute}.__set__"
        if name not in _IGNORED:
            self.func = func
            try:
                self.record(name, args, kwargs, out)
            except Exception as error:  # noqa: BLE001 - said in the notes; the user's forward goes on
                self.note(f"the trace could not follow {name} ({type(error).__name__}: {one_line(error)}); its result is read as mixing all it reads")
                self.lost(args, kwargs, out)
        return out

    def lost(self, args: tuple, kwargs: dict, out: object) -> None:
        """An op the trace failed on: its results come from everything it read, channels unknown."""
        acts = self.acts((args, kwargs))
        for o in (t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)):
            self.tag(o, _Info(acts, (), (None,) * o.dim(), UNKNOWN if acts else None))

    def record(self, name: str, args: tuple, kwargs: dict, out: object) -> None:
        if name in ("__setitem__", "data.__set__"):  # a tensor written in place: it holds what was written
            self.written(name, args)
            return
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
        if not outs:
            return
        if name in _RNN or name in _CELL:
            self.recurrent(name, args, outs)
            return
        if name in _SYNAPSES and self.synapse(name, args, kwargs, outs):
            return
        operands = [args[0]] if name in _VIEWS and args and isinstance(args[0], Tensor) else pytree.tree_leaves((args, kwargs))
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        known = [(t, i) for t in operands if (i := self.info(t)) is not None]
        if not known:
            if self.neuron_calls and not tensors:  # a new tensor made inside a neuron (torch.zeros): its initial state
                for o in outs:
                    self.tag(o, _Info(frozenset({("own", self.neuron_calls[-1])}), (), (None,) * o.dim()))
            return
        if name in _CREATES:  # new values: inside a neuron, its own state (an initial membrane)
            acts = frozenset({("own", self.neuron_calls[-1])}) if self.neuron_calls else frozenset()
        else:
            acts = frozenset().union(*(i.acts for _, i in known))
        shapes = [t.shape for t in tensors]
        try:
            common = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            common = None
        pointwise = name not in _VIEWS and name not in _PICKS and name not in _REDUCTIONS and all(tuple(o.shape) == common for o in outs)
        if acts and not self.neuron_calls and self.mixing(name, args, kwargs, known, tensors, outs, pointwise):
            return
        elementwise = pointwise and _elementwise(name)
        if acts and not self.neuron_calls and not elementwise and name not in _VIEWS and name not in _PICKS and name not in _CREATES:
            if any(self.across_neurons(name, args, kwargs, t, i, outs[0]) for t, i in known if i.acts):
                # softmax, a sum over neurons, a pooling...: every output reads many activations, a fixed synapse
                acts = frozenset({self.used(MIXED, name, None, None, 1, 1, acts, self.here(f"{name}(...)"), None, False)})
        for k, o in enumerate(outs):
            weights: dict = {}
            labels: list = [None] * o.dim()
            for t, i in known:
                if name in _VIEWS:
                    through = _through_view(name, args, kwargs, t, o)
                elif name in _PICKS:
                    through = _through_pick(name, args, kwargs, t, o)
                elif pointwise:
                    through = _aligned(t, o)
                else:
                    through = self.reduced(name, args, kwargs, t, o)
                through = through or (None,) * o.dim()
                if not acts:
                    for weight, dims in i.weights:
                        weights.setdefault(weight, _compose(dims, through))
                for d, label in enumerate(_compose(i.labels, through)):
                    labels[d] = labels[d] or label
            if name == "stack":
                dim = _positive(_arg(args, kwargs, 1, "dim", 0), o.dim())
                labels[dim] = "time" if self.steps and len(_arg(args, kwargs, 0, "tensors")) == self.steps else None
            self.tag(o, _Info(acts, tuple(weights.items()), tuple(labels), self.channels_of(name, args, kwargs, known, o, k, elementwise)))

    def across_neurons(self, name: str, args: tuple, kwargs: dict, source: Tensor, info: _Info, out: Tensor) -> bool:
        """Whether an op that is not elementwise mixes ``source``'s values along a dim other than
        the batch and the time: a reduction over such a dim, or any other op over a tensor that
        has one."""
        labels = info.labels if len(info.labels) == source.dim() else (None,) * source.dim()
        if name in _REDUCTIONS:
            kept = self.reduced(name, args, kwargs, source, out)
            if kept is None:
                return True
            gone = set(range(source.dim())) - {d for d in kept if d is not None}
            return any(labels[d] not in ("batch", "time") and source.shape[d] > 1 for d in gone)
        return any(label not in ("batch", "time") and size > 1 for size, label in zip(source.shape, labels))

    def reduced(self, name: str, args: tuple, kwargs: dict, source: Tensor, out: Tensor) -> tuple | None:
        """A reduction's dims: the dims it keeps, in order; None for any other op."""
        if name not in _REDUCTIONS:
            return None
        dims = _arg(args, kwargs, 1, "dim")
        if dims is None or isinstance(dims, torch.dtype):
            return () if out.dim() == 0 else None
        gone = {_positive(d, source.dim()) for d in ([dims] if isinstance(dims, int) else dims)}
        keep = out.dim() == source.dim()
        return tuple(None if d in gone else d for d in range(source.dim())) if keep else tuple(d for d in range(source.dim()) if d not in gone)

    def channels_of(self, name: str, args: tuple, kwargs: dict, known: list, out: Tensor, k: int, elementwise: bool) -> object:
        """Which input channels reach each element of ``out`` (the ``k``-th result)."""
        carrying = [(t, i.channels) for t, i in known if i.channels is not None]
        if not carrying or name in _CREATES:  # new values: no input channel reaches them
            return None
        if any(channels == UNKNOWN for _, channels in carrying):
            return UNKNOWN
        if name in _VIEWS or (elementwise and name not in _PICKS):
            found: dict = {}
            for t, (dim, sets) in carrying:
                through = _through_view(name, args, kwargs, t, out) if name in _VIEWS else _aligned(t, out)
                if dim is None:
                    found.setdefault(None, []).append(sets)
                    continue
                mapped = [d for d, source in enumerate(through or ()) if source == dim]
                if len(mapped) != 1:
                    return UNKNOWN
                found.setdefault(mapped[0], []).append(sets if t.shape[dim] == out.shape[mapped[0]] else sets * out.shape[mapped[0]])
            dims = [d for d in found if d is not None]
            if len(dims) > 1:
                return UNKNOWN
            dim = dims[0] if dims else None
            width = out.shape[dim] if dim is not None else 1
            merged = [frozenset().union(*(s[j] for s in found.get(dim, [])), *(s[0] for s in found.get(None, []))) for j in range(width)]
            return (dim, tuple(merged))
        if name in _REDUCTIONS:
            (t, channels), through = carrying[0], self.reduced(name, args, kwargs, carrying[0][0], out)
            if through is None or len(carrying) > 1:
                return UNKNOWN
            dim = channels[0]
            if dim is None:
                return channels
            mapped = [d for d, source in enumerate(through) if source == dim]
            return (mapped[0], channels[1]) if mapped else _merged(channels)
        if name in _PICKS:
            return self.picked(name, args, kwargs, known, k)
        return UNKNOWN

    def picked(self, name: str, args: tuple, kwargs: dict, known: list, k: int) -> object:
        """The channels of a picking op's ``k``-th result: the op run again on index probes."""
        table: list[frozenset] = []
        probes: dict[int, Tensor] = {}
        for t, i in known:
            if i.channels is None:
                continue
            dim, sets = i.channels
            probes[id(t)] = _channel_probe(t, i.channels, len(table))
            table += list(sets)

        def probed(value):
            if not isinstance(value, Tensor):
                return value
            return probes.get(id(value), torch.full(value.shape, -1.0, dtype=torch.float64) if value.is_floating_point() else value)

        func = self.func  # the op as the forward called it: a method's arguments are not the function's
        result = func(*pytree.tree_map(probed, args), **pytree.tree_map(probed, kwargs))
        results = [r for r in pytree.tree_leaves(result) if isinstance(r, Tensor)]
        return _decoded(results[k], table)

    def written(self, name: str, args: tuple) -> None:
        """``target[...] = value`` or ``target.data = value``: the target now holds the value's sources."""
        target, value = args[0], args[-1]
        old, new = self.info(target), self.info(value)
        if new is None or not isinstance(target, Tensor):
            return
        if name == "data.__set__" or old is None:
            self.tag(target, _Info(new.acts, new.weights, new.labels, new.channels))
        else:
            channels = None if old.channels is None and new.channels is None else UNKNOWN
            self.tag(target, _Info(old.acts | new.acts, old.weights, old.labels, channels))

    def mixing(self, name: str, args: tuple, kwargs: dict, known: list, tensors: list, outs: list, pointwise: bool) -> bool:
        """Outside neurons, an op that mixes an activation with a tensor that is not one: a gain
        (an elementwise product whose weight lines up with the activation's dims), or a synapse
        the trace reads without an orientation.  False for anything else."""
        fixed = [t for t in tensors if not (self.info(t) is not None and self.info(t).acts)]
        weights = [t for t in fixed if t.numel() > 1 and (self.info(t) is not None or id(t) in self.buffers or t.dim() >= 2)]
        active = [t for t in tensors if self.info(t) is not None and self.info(t).acts]
        if not weights or not active:
            return False
        if pointwise and name not in _PRODUCTS:
            return False  # a bias, a threshold: not a synapse
        if pointwise and all(self.one_to_one(w, active, outs[0]) for w in weights):
            op, what = "gain", "x * weight"  # every dim of the weight is one of the activation's: one-to-one
        else:
            op, what = name, f"{name}(...)"
        reads = self.inside(frozenset().union(*(self.info(a).acts for a in active)))
        current = self.uses_of(weights, op, reads, what, None, None, 1, 1, None)
        labels = next((self.info(a).labels for a in active if len(self.info(a).labels) == outs[0].dim()), (None,) * outs[0].dim())
        for k, o in enumerate(outs):
            channels = self.channels_of(name, args, kwargs, [(t, i) for t, i in known], o, k, pointwise) if op == "gain" else (
                _merged(next((self.info(a).channels for a in active if self.info(a).channels is not None), None))
                if any(self.info(a).channels is not None for a in active) else None
            )
            self.tag(o, _Info(current, (), labels if len(labels) == o.dim() else (None,) * o.dim(), channels if op == "gain" else (UNKNOWN if channels else None)))
        return True

    @staticmethod
    def one_to_one(weight: Tensor, active: list, out: Tensor) -> bool:
        """Whether every dim of ``weight`` in a broadcast product is a dim of an activation, so that
        each element of the activation meets one element of the weight (a gain)."""
        held = _aligned(weight, out)
        if held is None:
            return False
        for position, dim in enumerate(held):  # an activation stretched along a weight's dim meets many of its elements
            if dim is not None and not any((seen := _aligned(a, out)) is not None and seen[position] is not None for a in active):
                return False
        return True

    def uses_of(self, weights: list, op: str, reads: frozenset, what: str, out_dim, in_dim, groups: int, gates: int, rows) -> frozenset:
        """Record a synapse for each weight tensor (a Parameter's dims through its info, or a fixed
        one by its buffer's name), and return the current they make."""
        current = set()
        for weight in weights:
            info = self.info(weight)
            named = info.weights if info is not None and info.weights else ()
            if named:
                for weight_name, dims in named:
                    mapped = [dims[d] if d is not None and d < len(dims) else None for d in (out_dim, in_dim)]
                    current.add(self.used(weight_name, op, *mapped, groups, gates, reads, self.here(what), rows, True))
            else:
                fixed = f"{self.buffers[id(weight)]} (a buffer)" if id(weight) in self.buffers else MADE
                current.add(self.used(fixed, op, out_dim, in_dim, groups, gates, reads, self.here(what), rows, False))
        return frozenset(current)

    def inside(self, reads: frozenset) -> frozenset:
        """What a synapse inside a neuron's call reads: what it is given; or, where it reads the
        neuron's own state (its membrane or spikes: what the state it is given or keeps, or makes
        afresh, became), the population itself."""
        if self.neuron_calls:
            population = self.neuron_calls[-1]
            if not reads or ("own", population) in reads:  # through the neuron's dynamics: it reads the neuron
                return frozenset({("state", population)})
        return reads

    def used(self, name: str, op: str, outputs, inputs, groups: int, gates: int, reads: frozenset, where: str, rows, parameter: bool) -> tuple:
        use = Use(len(self.result.all_uses), name, op, outputs, inputs, groups, gates, reads, where, rows, parameter)
        self.result.all_uses.append(use)
        if parameter:
            self.result.uses.setdefault(name, []).append(use)
        return ("current", use.index)

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
        if not all(isinstance(t, Tensor) for t in operands):
            return False
        infos = [self.info(t) for t in operands]
        activations = [k for k, i in enumerate(infos) if i is not None and i.acts]
        weights = [k for k in range(len(operands)) if k not in activations]
        if not activations:
            return self.weight_product(name, operands, infos, outs) if name in _MATMUL else False
        if len(weights) != 1:
            return False
        k = weights[0]
        weight = operands[k]
        act, act_info = operands[activations[0]], infos[activations[0]]
        act_labels = act_info.labels
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
        rows = weight.shape[out_dim] if out_dim is not None else None
        current = self.uses_of([weight], op, reads, what, out_dim, in_dim, groups, 1, rows)
        channels = self.synapse_channels(op, weight, act, act_info, out_dim, in_dim, groups, outs[0])
        for o in outs:
            fitted = tuple(labels)[: o.dim()] + (None,) * max(0, o.dim() - len(labels))
            self.tag(o, _Info(current, (), fitted, channels))
        return True

    def synapse_channels(self, op: str, weight: Tensor, act: Tensor, info: _Info, out_dim, in_dim, groups: int, out: Tensor) -> object:
        """The channels reaching each output of a synapse: through the weight's non-zero entries."""
        if info.channels is None:
            return None
        if info.channels == UNKNOWN or out_dim is None or in_dim is None:
            return UNKNOWN
        dim, sets = info.channels
        nonzero = weight.detach() != 0
        if op in ("conv", "conv_transpose"):
            if dim != (1 if act.dim() == weight.dim() else 0) or nonzero.shape[2:] != (1,) * (weight.dim() - 2):
                return UNKNOWN  # a convolution with a kernel mixes positions too: not followed
            matrix = Layout(groups=groups, transposed=op == "conv_transpose").matrix(nonzero)
            outputs, per_group = matrix.shape[0], matrix.shape[1]
            result = [frozenset().union(*(sets[(o // (outputs // groups)) * per_group + i] for i in range(per_group) if matrix[o, i]))
                      for o in range(outputs)]
            return (dim, tuple(result))
        if weight.dim() != 2 or (dim is not None and dim != act.dim() - 1):
            return UNKNOWN
        matrix = nonzero if (out_dim, in_dim) == (0, 1) else nonzero.t()
        if dim is None:
            sets = sets * matrix.shape[1]
        return (out.dim() - 1, tuple(frozenset().union(*(sets[i] for i in range(matrix.shape[1]) if matrix[o, i])) for o in range(matrix.shape[0])))

    def weight_product(self, name: str, operands: list, infos: list, outs: list) -> bool:
        """A product of a weight with tensors that are no activations (orthogonal's ``base @ Q``):
        a weight still, its dims those of its operand's where the product keeps them."""
        named = [(k, i) for k, i in enumerate(infos) if i is not None and i.weights]
        if not named or outs[0].dim() < 2:
            return False
        weights = {}
        for k, info in named:
            t = operands[k]
            keep = {len(operands) - 1: (outs[0].dim() - 1, t.dim() - 1), 0: (outs[0].dim() - 2, t.dim() - 2)}.get(k)
            for weight, dims in info.weights:
                mapped = [None] * outs[0].dim()
                if keep is not None and t.dim() >= 2:
                    mapped[keep[0]] = dims[keep[1]] if keep[1] < len(dims) else None
                weights.setdefault(weight, tuple(mapped))
        self.tag(outs[0], _Info(frozenset(), tuple(weights.items()), (None,) * outs[0].dim()))
        return True

    def einsum(self, equation: str, operands: list, infos: list, k: int, activations: list) -> tuple | None:
        """An einsum's reading of operand ``k``: the letter it shares only with the output
        indexes the output neurons, the one it shares only with the activations the inputs
        (``...`` stands for the activation's leading dims)."""
        equation = equation.replace(" ", "")
        if not re.fullmatch(r"[A-Za-z,.]+(->[A-Za-z.]*)?", equation):
            return None
        left, arrow, output = equation.partition("->")
        subscripts = left.split(",")
        if any("..." in s for s in (subscripts[k],)):
            return None  # a weight with an ellipsis: no one dim to read
        if not arrow:
            letters = "".join(subscripts).replace(".", "")
            output = "..." * any("..." in s for s in subscripts) + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
        mine = subscripts[k]
        theirs = set("".join(subscripts[a] for a in activations).replace(".", ""))
        outs = [c for c in mine if c in output and c not in theirs]
        ins = [c for c in mine if c in theirs and c not in output]
        act_subscripts, act_labels = subscripts[activations[0]], infos[activations[0]].labels
        if "..." in act_subscripts:  # the ellipsis takes the activation's leading dims, the output's too
            lead = len(act_labels) - len(act_subscripts.replace("...", ""))
            labels = tuple(act_labels[:lead]) + tuple(None for c in output.replace("...", ""))
        else:
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
                (p, self.inside(self.acts(args[0])) if i == 0 else frozenset(), gates if p.shape[0] == gates * hidden else 1)
                for i, p in enumerate(matrices)
            ]
        current: set = set()
        for weight, reads, g in readers:
            info = self.info(weight)
            rows = info is not None and info.weights and info.weights[0][1][:2] == (0, 1)
            current |= self.uses_of([weight], name, reads, f"torch.{name}", 0 if rows else None, 1 if rows else None, 1, g, weight.shape[0])
        x_info = self.info(args[0])
        channels = UNKNOWN if x_info is not None and x_info.channels is not None else None
        for o in outs:
            labels = x_info.labels[:-1] + (None,) if x_info is not None and len(x_info.labels) == o.dim() else (None,) * o.dim()
            self.tag(o, _Info(frozenset(current), (), labels, channels))

    # neurons ---------------------------------------------------------------------------------------

    def kept(self, module: nn.Module) -> list[Tensor]:
        """The state a neuron module keeps: its buffers and the tensors among its attributes."""
        return [*(b for b in module._buffers.values() if isinstance(b, Tensor)), *(v for v in vars(module).values() if isinstance(v, Tensor))]

    def neuron_started(self, path: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A neuron module's call: it continues the population whose state it is given (or, given
        none, keeps), else it starts a population."""
        given = [t for t in pytree.tree_leaves((args[1:], kwargs)) if isinstance(t, Tensor)]
        state_in = given if given else self.kept(module)
        tokens = self.acts(state_in)
        # only state a call of this module made continues its population: a tensor merely given to
        # an earlier call (one zeros tensor started two layers) starts another
        mine = sorted(p for kind, p in (t for t in tokens if t[0] in ("state", "spikes")) if self.result.populations[p] == path)
        if mine:
            population = mine[0]
        else:
            population = len(self.result.populations)
            self.result.populations.append(path)
            self.result.modules.append(module)
        self.neuron_calls.append(population)
        own = ("own", population)  # the state it is given or keeps is the neuron's own, whatever its values
        for t in state_in:
            info = self.info(t)
            self.tag(t, _Info(info.acts | {own}, info.weights, info.labels, None) if info is not None else _Info(frozenset({own}), (), (None,) * t.dim()))
        current = self.info(args[0]) if args and isinstance(args[0], Tensor) else None
        self.entering = current.channels if current is not None else None

    def neuron_ended(self, path: str, module: nn.Module, output: object) -> None:
        population = self.neuron_calls.pop()
        entering, self.entering = getattr(self, "entering", None), None
        leaves = [t for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]
        if not leaves:
            self.result.calls.append(Call(population, None, False))
            return
        spikes = leaves[0]
        reached = frozenset().union(*(i.acts for t in leaves if (i := self.info(t)) is not None))
        # the module's constants (a threshold buffer) carry the last population's state tag: not a connection
        reached = frozenset(t for t in reached if t[0] not in ("state", "own") or t[1] == population or self.result.populations[t[1]] != path)
        labels, found = self.neuron_labels(module, spikes)
        neurons = math.prod(size for size, label in zip(spikes.shape, labels) if label not in ("batch", "time"))
        first = next((c.neurons for c in self.result.calls if c.population == population), None)
        if first is not None and first != neurons:  # spikes of another size: snnTorch starts its state afresh
            population = len(self.result.populations)
            self.result.populations.append(path)
            self.result.modules.append(module)
            stale = {q for q, other in enumerate(self.result.populations) if other == path}  # the state it dropped
            reached = frozenset(t for t in reached if t[0] not in ("state", "spikes", "own") or t[1] not in stale)
        self.result.calls.append(Call(population, neurons, found))
        self.result.feeds[population] = self.result.feeds.get(population, frozenset()) | reached
        made = self.info(spikes)
        if entering is not None:  # the input reaches it: its spikes say which channels reach each neuron, synapses inside it too
            entering = made.channels if made is not None and made.channels is not None else UNKNOWN
        if entering is not None and population not in self.result.fans:
            neuron_dim = next((d for d, label in enumerate(labels) if label not in ("batch", "time") and spikes.shape[d] == neurons), None)
            self.result.fans[population] = _fan(entering, neuron_dim if neuron_dim is not None else spikes.dim() - 1, neurons)
        self.tag(spikes, _Info(frozenset({("spikes", population)}), (), tuple(labels)))
        state_token = frozenset({("state", population)})
        for t in [*leaves[1:], *self.kept(module)]:
            if t is not spikes:
                self.tag(t, _Info(state_token, (), self.info(t).labels if self.info(t) is not None else ()))

    def neuron_labels(self, module: nn.Module, spikes: Tensor) -> tuple[tuple, bool]:
        """The batch and time dims of a neuron's spikes: followed from the example, else by the
        module's contract (Norse's sequence modules are time-major, snnTorch's and Norse's cells
        batch-first), else dim 0 as the batch (noted)."""
        info = self.info(spikes)
        labels = list(info.labels) if info is not None and len(info.labels) == spikes.dim() else [None] * spikes.dim()
        family = type(module).__module__.partition(".")[0]
        sequence = family == "norse" and not type(module).__name__.endswith("Cell") and spikes.dim() >= 2
        if sequence:
            labels[0] = "time"
            if "batch" not in labels:
                labels[1] = "batch"
        if "batch" not in labels and spikes.dim() > 1:
            labels[0] = "batch"
            return tuple(labels), family in ("snntorch", "norse")
        return tuple(labels), True


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
    """Afterwards ``model`` is exactly as before: its parameters and buffers (their values, however
    written, and ``requires_grad``), its attributes (training modes, tensors a forward stored), the
    contents of its dicts and lists (submodules and hooks a forward may add), its generators'
    states, and the random states of torch, Python and numpy."""
    modules = list(model.modules())
    saved = state.snapshot(modules, attributes=True)
    values = [(t, t.detach().clone(), t.requires_grad) for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if isinstance(t, Tensor)]
    contents = [(value, dict(value)) for module in modules for value in vars(module).values() if isinstance(value, dict)]
    lists = [(value, list(value)) for module in modules for value in vars(module).values() if isinstance(value, list)]
    generators = [(g, g.get_state()) for module in modules for g in vars(module).values() if isinstance(g, torch.Generator)]
    rng, python_rng = torch.get_rng_state(), random.getstate()
    numpy = sys.modules.get("numpy")  # a forward may draw from numpy's generator, if numpy is loaded
    numpy_rng = numpy.random.get_state() if numpy is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(rng)
        random.setstate(python_rng)
        if numpy_rng is not None:
            numpy.random.set_state(numpy_rng)
        for generator, held in generators:
            generator.set_state(held)
        for value, items in contents:
            value.clear()
            value.update(items)
        for value, items in lists:
            value[:] = items
        state.restore(saved)
        with torch.no_grad():
            for tensor, value, requires_grad in values:
                if not (tensor.is_inference() or same_bits(tensor, value)):
                    tensor.copy_(value)  # written without a trace in its version counter (.data)
                if tensor.requires_grad != requires_grad and tensor.is_leaf:
                    tensor.requires_grad_(requires_grad)


def trace(model: nn.Module, example: Tensor, neurons: Mapping[str, nn.Module], dims: str | None = None) -> Trace:
    """Run ``model(example)`` once, under ``torch.no_grad()``, and return what it computed.

    ``neurons`` are the neuron modules by dotted name (each call of one is a population's step);
    ``dims`` reads the example's dims (:func:`example_dims`).  Afterwards the model is exactly as
    before (see :func:`_unchanged`), and nothing has gradients.

    Raises:
        ValueError: ``model`` holds a lazy module not initialized yet (run one forward first), or
            a tensor on the meta device.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its module, run eagerly
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(f"{one_line(lazy[0])} is not initialized yet (a lazy module): run one forward pass of the model first, then trace it")
    meta = [name for name, t in [("example", example), *model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"{one_line(meta[0])} is on the meta device: the trace computes, so materialize the model (model.to_empty(device=...)) and give a real example")
    letters = example_dims(example, dims)
    steps = example.shape[letters.index("t")] if "t" in letters else 0
    buffers = {id(b): name for name, b in model.named_buffers()}
    tracer = _Tracer(parameter_names(model), buffers, steps)
    labels = tuple({"b": "batch", "t": "time"}.get(letter) for letter in letters)
    channel_dims = [d for d, letter in enumerate(letters) if letter not in "bt" and example.shape[d] > 1]
    if not channel_dims:
        channels: object = (None, (frozenset({0}),))
    elif len(channel_dims) == 1:
        channels = (channel_dims[0], tuple(frozenset({c}) for c in range(example.shape[channel_dims[0]])))
    else:
        channels = UNKNOWN
        tracer.note(
            f"the example has its channels along {len(channel_dims)} dims, and the trace follows them along one: to check "
            "the front end, give the example with its channels flattened (e.g. x.flatten(2), dims='tbc')"
        )
    tracer.tag(example, _Info(frozenset({INPUT}), (), labels, channels))
    tracer.result.channels = math.prod(size for size, letter in zip(example.shape, letters) if letter not in "bt")
    with _unchanged(model), tracing(model), torch.no_grad(), contextlib.ExitStack() as hooks:
        for name, module in model.named_modules():
            hooks.enter_context(_watched(tracer, name, module, neurons.get(name) is module))
        with tracer:
            model(example)
            kept = _kept_between_calls(tracer, model, neurons)
            if kept:  # what one call leaves for the next: a second call shows what reads it
                tracer.note(f"{', '.join(map(one_line, kept))} carries activations from one call to the next: read over two calls of the model")
                model(example)
    return _layers_over_time(tracer.result)


def _kept_between_calls(tracer: _Tracer, model: nn.Module, neurons: Mapping[str, nn.Module]) -> list[str]:
    """The buffers and tensor attributes of modules other than neurons that hold activations
    after a call (a model stepped once per call, keeping its last spikes for the next)."""
    found = []
    for path, module in model.named_modules():
        if any(within(path, name) for name in neurons):
            continue
        for local, value in [*module._buffers.items(), *vars(module).items()]:
            info = tracer.infos.get(value) if isinstance(value, Tensor) else None
            if info is not None and info.acts:
                found.append(f"{path}.{local}" if path else local)
    return list(dict.fromkeys(found))


def _layers_over_time(traced: Trace) -> Trace:
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


@contextlib.contextmanager
def _watched(tracer: _Tracer, name: str, module: nn.Module, neuron: bool) -> Iterator[None]:
    """Hooks that tell the tracer which module runs, and a neuron's calls."""

    if isinstance(module, parametrize.ParametrizationList):  # its output is the weight the forward reads, dims as its own
        owner, _, tensor_name = f".{name}".rpartition(".parametrizations.")
        weight_name = f"{owner[1:]}.{tensor_name}" if owner else tensor_name

        def computed(module, args, output):
            if isinstance(output, Tensor):
                tracer.tag(output, _Info(weights=((weight_name, tuple(range(output.dim()))),), labels=(None,) * output.dim()))

        handle = module.register_forward_hook(computed)
        try:
            yield
        finally:
            handle.remove()
        return

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
    if use.outputs is None or use.inputs is None:
        return None
    if dims == 2 and reading == (1, 0):
        return Layout(inputs_first=True)
    return Layout() if use.outputs == 0 else None


def layouts_read(traced: Trace, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[Layout | None, Use]]:
    """Each weight the forward used as a synapse (of 2 or more dims, by ``shapes``), with the layout
    its uses read it with and one of those uses; None where no use says which dim indexes the
    output neurons.  A gain (an elementwise product) is no matrix: a weight used only so is left
    out.  A use that reads only some of a weight's output neurons (the forward splits it) is said
    in a warning: nwave_param cuts the weight's blocks from its first row.

    Raises:
        ValueError: a weight read in two ways (``x @ W`` and ``F.linear(x, W)``), naming both uses.
    """
    import warnings

    found: dict[str, tuple[Layout | None, Use]] = {}
    for name, uses in traced.uses.items():
        shape = shapes.get(name)
        if shape is None or len(shape) < 2:
            continue
        readings: dict[Layout | None, Use] = {}
        for use in uses:
            if use.op != "gain":
                readings.setdefault(_layout_of_use(use, len(shape)), use)
        known = {layout: use for layout, use in readings.items() if layout is not None}
        if len(known) > 1:
            (_, use_a), (_, use_b) = list(known.items())[:2]
            raise ValueError(
                f"{one_line(name)} is read two ways: {one_line(use_a.describe())} and {one_line(use_b.describe())}; one weight is one "
                "matrix on the chip: use it one way, or give each use a weight of its own"
            )
        if not readings:
            continue
        found[name] = next(iter(known.items())) if known else (None, next(iter(readings.values())))
        layout, use = found[name]
        rows = layout.rows(shape) if layout is not None else None
        partial = [u for u in uses if u.op != "gain" and rows is not None and u.rows is not None and u.rows < rows // max(1, layout.groups if layout.transposed else 1)]
        if partial and layout is not None and not layout.gates > 1:
            warnings.warn(
                f"{one_line(name)}: the forward uses {partial[0].rows} of its {rows} output rows in {one_line(partial[0].where)}: "
                "nwave_param cuts its blocks of output neurons from its first row, so a part that starts elsewhere may share a "
                "block with another; give each part a weight of its own",
                stacklevel=4,
            )
    return found
