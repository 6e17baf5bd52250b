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
neurons (a sum over them, a softmax, a pooling), is a fixed synapse of its own.  The op says
which of the weight's dims indexes the output neurons and which the inputs: ``x @ W`` reads
``W`` as ``[in, out]``, the chip vendor's convention; ``F.linear(x, W)`` as ``[out, in]``,
torch's.  A buffer or a tensor made in the forward is a synapse too, fixed: it connects
populations, though nwave_param does not train it.

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
import math
import random
import re
import sys
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakTensorKeyDictionary

from nwave_param.core import state
from nwave_param.core.neurons import within
from nwave_param.core.passes import tracing
from nwave_param.core.trace.channels import channel_probe, decoded_channels, fan_of, merged_channels
from nwave_param.core.trace.dims import (
    CREATES,
    IGNORED,
    PICKS,
    REDUCTIONS,
    VIEWS,
    aligned_dims,
    argument,
    composed,
    example_dims,
    positive_dim,
    through_pick,
    through_view,
)
from nwave_param.core.trace.populations import layers_over_time
from nwave_param.core.trace.records import INPUT, MADE, UNKNOWN, Call, Info, Trace, Use
from nwave_param.core.trace.synapses import (
    CELL,
    CONV,
    CONV_TRANSPOSE,
    MATMUL,
    MIXED,
    PRODUCTS,
    RNN,
    RNN_OPS,
    SYNAPSES,
    is_elementwise,
    kernel_reach,
)
from nwave_param.errors import one_line
from nwave_param.layout import Layout
from nwave_param.sharing import same_bits

__all__ = ["parameter_names", "trace"]


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

    def info(self, tensor: object) -> Info | None:
        if not isinstance(tensor, Tensor):
            return None
        found = self.infos.get(tensor)
        if found is None and id(tensor) in self.names:
            found = Info(weights=((self.names[id(tensor)], tuple(range(tensor.dim()))),))
            self.tag(tensor, found)
        return found

    def tag(self, tensor: Tensor, info: Info) -> None:
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
        if name not in IGNORED:
            self.func = func
            try:
                self.record(name, args, kwargs, out)
            except Exception as error:  # noqa: BLE001 - said in the notes; the user's forward goes on
                self.note(
                    f"the trace could not follow {name} ({type(error).__name__}: {one_line(error)}); "
                    "its result is read as mixing all it reads"
                )
                self.lost(args, kwargs, out)
        return out

    def lost(self, args: tuple, kwargs: dict, out: object) -> None:
        """An op the trace failed on: its results come from everything it read, channels unknown."""
        acts = self.acts((args, kwargs))
        for o in (t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)):
            self.tag(o, Info(acts, (), (None,) * o.dim(), UNKNOWN if acts else None))

    def record(self, name: str, args: tuple, kwargs: dict, out: object) -> None:
        if name in ("__setitem__", "data.__set__"):  # a tensor written in place: it holds what was written
            self.written(name, args)
            return
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, Tensor)]
        if not outs:
            return
        if name in RNN_OPS:
            self.recurrent(name, args, outs)
            return
        if name in SYNAPSES and self.synapse(name, args, kwargs, outs):
            return
        operands = [args[0]] if name in VIEWS and args and isinstance(args[0], Tensor) else pytree.tree_leaves((args, kwargs))
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        known = [(t, i) for t in operands if (i := self.info(t)) is not None]
        if not known:
            if self.neuron_calls and not tensors:  # a new tensor made inside a neuron (torch.zeros): its initial state
                for o in outs:
                    self.tag(o, Info(frozenset({("own", self.neuron_calls[-1])}), (), (None,) * o.dim()))
            return
        if name in CREATES:  # new values: inside a neuron, its own state (an initial membrane)
            acts = frozenset({("own", self.neuron_calls[-1])}) if self.neuron_calls else frozenset()
        else:
            acts = frozenset().union(*(i.acts for _, i in known))
        shapes = [t.shape for t in tensors]
        try:
            common = tuple(torch.broadcast_shapes(*shapes))
        except RuntimeError:
            common = None
        pointwise = name not in VIEWS and name not in PICKS and name not in REDUCTIONS and all(tuple(o.shape) == common for o in outs)
        if acts and not self.neuron_calls and self.mixing(name, args, kwargs, known, tensors, outs, pointwise):
            return
        elementwise = pointwise and is_elementwise(name)
        if acts and not self.neuron_calls and not elementwise and name not in VIEWS and name not in PICKS and name not in CREATES:
            if any(self.across_neurons(name, args, kwargs, t, i, outs[0]) for t, i in known if i.acts):
                # softmax, a sum over neurons, a pooling...: every output reads many activations, a fixed synapse
                acts = frozenset({self.used(MIXED, name, None, None, 1, 1, acts, self.here(f"{name}(...)"), None, False)})
        for k, o in enumerate(outs):
            weights: dict = {}
            labels: list = [None] * o.dim()
            for t, i in known:
                if name in VIEWS:
                    through = through_view(name, args, kwargs, t, o)
                elif name in PICKS:
                    through = through_pick(name, args, kwargs, t, o)
                elif pointwise:
                    through = aligned_dims(t, o)
                else:
                    through = self.reduced(name, args, kwargs, t, o)
                through = through or (None,) * o.dim()
                if not acts:
                    for weight, dims in i.weights:
                        weights.setdefault(weight, composed(dims, through))
                for d, label in enumerate(composed(i.labels, through)):
                    labels[d] = labels[d] or label
            if name == "stack":
                dim = positive_dim(argument(args, kwargs, 1, "dim", 0), o.dim())
                labels[dim] = "time" if self.steps and len(argument(args, kwargs, 0, "tensors")) == self.steps else None
            self.tag(o, Info(acts, tuple(weights.items()), tuple(labels), self.channels_of(name, args, kwargs, known, o, k, elementwise)))

    def across_neurons(self, name: str, args: tuple, kwargs: dict, source: Tensor, info: Info, out: Tensor) -> bool:
        """Whether an op that is not elementwise mixes ``source``'s values along a dim other than
        the batch and the time: a reduction over such a dim, or any other op over a tensor that
        has one."""
        labels = info.labels if len(info.labels) == source.dim() else (None,) * source.dim()
        if name in REDUCTIONS:
            kept = self.reduced(name, args, kwargs, source, out)
            if kept is None:
                return True
            gone = set(range(source.dim())) - {d for d in kept if d is not None}
            return any(labels[d] not in ("batch", "time") and source.shape[d] > 1 for d in gone)
        return any(label not in ("batch", "time") and size > 1 for size, label in zip(source.shape, labels))

    def reduced(self, name: str, args: tuple, kwargs: dict, source: Tensor, out: Tensor) -> tuple | None:
        """A reduction's dims: the dims it keeps, in order; None for any other op."""
        if name not in REDUCTIONS:
            return None
        dims = argument(args, kwargs, 1, "dim")
        if dims is None or isinstance(dims, torch.dtype):
            return () if out.dim() == 0 else None
        gone = {positive_dim(d, source.dim()) for d in ([dims] if isinstance(dims, int) else dims)}
        keep = out.dim() == source.dim()
        if keep:
            return tuple(None if d in gone else d for d in range(source.dim()))
        return tuple(d for d in range(source.dim()) if d not in gone)

    def channels_of(self, name: str, args: tuple, kwargs: dict, known: list, out: Tensor, k: int, elementwise: bool) -> object:
        """Which input channels reach each element of ``out`` (the ``k``-th result)."""
        carrying = [(t, i.channels) for t, i in known if i.channels is not None]
        if not carrying or name in CREATES:  # new values: no input channel reaches them
            return None
        if any(channels == UNKNOWN for _, channels in carrying):
            return UNKNOWN
        if name in VIEWS or (elementwise and name not in PICKS):
            found: dict = {}
            for t, (dim, sets) in carrying:
                through = through_view(name, args, kwargs, t, out) if name in VIEWS else aligned_dims(t, out)
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
        if name in REDUCTIONS:
            (t, channels), through = carrying[0], self.reduced(name, args, kwargs, carrying[0][0], out)
            if through is None or len(carrying) > 1:
                return UNKNOWN
            dim = channels[0]
            if dim is None:
                return channels
            mapped = [d for d, source in enumerate(through) if source == dim]
            return (mapped[0], channels[1]) if mapped else merged_channels(channels)
        if name in PICKS:
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
            probes[id(t)] = channel_probe(t, i.channels, len(table))
            table += list(sets)

        def probed(value):
            if not isinstance(value, Tensor):
                return value
            return probes.get(id(value), torch.full(value.shape, -1.0, dtype=torch.float64) if value.is_floating_point() else value)

        func = self.func  # the op as the forward called it: a method's arguments are not the function's
        result = func(*pytree.tree_map(probed, args), **pytree.tree_map(probed, kwargs))
        results = [r for r in pytree.tree_leaves(result) if isinstance(r, Tensor)]
        return decoded_channels(results[k], table)

    def written(self, name: str, args: tuple) -> None:
        """``target[...] = value`` or ``target.data = value``: the target now holds the value's sources."""
        target, value = args[0], args[-1]
        old, new = self.info(target), self.info(value)
        if new is None or not isinstance(target, Tensor):
            return
        if name == "data.__set__" or old is None:
            self.tag(target, Info(new.acts, new.weights, new.labels, new.channels))
        else:
            channels = None if old.channels is None and new.channels is None else UNKNOWN
            self.tag(target, Info(old.acts | new.acts, old.weights, old.labels, channels))

    def mixing(self, name: str, args: tuple, kwargs: dict, known: list, tensors: list, outs: list, pointwise: bool) -> bool:
        """Outside neurons, an op that mixes an activation with a tensor that is not one: a gain
        (an elementwise product whose weight lines up with the activation's dims), or a synapse
        the trace reads without an orientation.  False for anything else."""
        fixed = [t for t in tensors if not (self.info(t) is not None and self.info(t).acts)]
        weights = [t for t in fixed if t.numel() > 1 and (self.info(t) is not None or id(t) in self.buffers or t.dim() >= 2)]
        active = [t for t in tensors if self.info(t) is not None and self.info(t).acts]
        if not weights or not active:
            return False
        if pointwise and name not in PRODUCTS:
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
                merged_channels(next((self.info(a).channels for a in active if self.info(a).channels is not None), None))
                if any(self.info(a).channels is not None for a in active) else None
            )
            shown = labels if len(labels) == o.dim() else (None,) * o.dim()
            self.tag(o, Info(current, (), shown, channels if op == "gain" else (UNKNOWN if channels else None)))
        return True

    @staticmethod
    def one_to_one(weight: Tensor, active: list, out: Tensor) -> bool:
        """Whether every dim of ``weight`` in a broadcast product is a dim of an activation, so that
        each element of the activation meets one element of the weight (a gain)."""
        held = aligned_dims(weight, out)
        if held is None:
            return False
        for position, dim in enumerate(held):  # an activation stretched along a weight's dim meets many of its elements
            if dim is not None and not any((seen := aligned_dims(a, out)) is not None and seen[position] is not None for a in active):
                return False
        return True

    def uses_of(
        self, weights: list, op: str, reads: frozenset, what: str, out_dim, in_dim, groups: int, gates: int, rows, unrolled=(1, 1)
    ) -> frozenset:
        """Record a synapse for each weight tensor (a Parameter's dims through its info, or a fixed
        one by its buffer's name), and return the current they make."""
        current = set()
        for weight in weights:
            info = self.info(weight)
            named = info.weights if info is not None and info.weights else ()
            if named:
                for weight_name, dims in named:
                    mapped = [dims[d] if d is not None and d < len(dims) else None for d in (out_dim, in_dim)]
                    current.add(self.used(weight_name, op, *mapped, groups, gates, reads, self.here(what), rows, True, unrolled))
            else:
                fixed = f"{self.buffers[id(weight)]} (a buffer)" if id(weight) in self.buffers else MADE
                current.add(self.used(fixed, op, out_dim, in_dim, groups, gates, reads, self.here(what), rows, False, unrolled))
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

    def used(
        self, name: str, op: str, outputs, inputs, groups: int, gates: int, reads: frozenset, where: str, rows, parameter: bool,
        unrolled: tuple[int, int] = (1, 1),
    ) -> tuple:
        use = Use(len(self.result.all_uses), name, op, outputs, inputs, groups, gates, reads, where, rows, parameter, unrolled)
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
            operands = [args[0], args[1], argument(args, kwargs, 2, "weight")]
        elif name in MATMUL:
            operands = [args[0], argument(args, kwargs, 1, "other", argument(args, kwargs, 1, "mat2", argument(args, kwargs, 1, "vec")))]
        else:
            operands = [args[0], argument(args, kwargs, 1, "weight")]
        if not all(isinstance(t, Tensor) for t in operands):
            return False
        infos = [self.info(t) for t in operands]
        activations = [k for k, i in enumerate(infos) if i is not None and i.acts]
        weights = [k for k in range(len(operands)) if k not in activations]
        if not activations:
            return self.weight_product(name, operands, infos, outs) if name in MATMUL else False
        if len(weights) != 1:
            return False
        k = weights[0]
        weight = operands[k]
        act, act_info = operands[activations[0]], infos[activations[0]]
        act_labels = act_info.labels
        reads = self.inside(frozenset().union(*(infos[a].acts for a in activations)))
        groups, out_dim, in_dim, op, unrolled = 1, None, None, name, (1, 1)
        if name == "linear":
            out_dim, in_dim, labels, what = 0, 1, act_labels[:-1] + (None,), "F.linear(x, weight)"
        elif name == "bilinear":
            out_dim, labels, what = 0, act_labels[:-1] + (None,), "F.bilinear(x1, x2, weight)"
        elif name in CONV or name in CONV_TRANSPOSE:
            transposed = name in CONV_TRANSPOSE
            groups = int(argument(args, kwargs, 6, "groups", 1))
            out_dim, in_dim = (1, 0) if transposed else (0, 1)
            batched = act.dim() == weight.dim()
            labels = ((act_labels[0] if act_labels else None,) if batched else ()) + (None,) * (outs[0].dim() - batched)
            op, what = ("conv_transpose" if transposed else "conv"), f"{name}(x, weight)"
            spatial = weight.dim() - 2
            out_map = outs[0].shape[outs[0].dim() - spatial:]
            unrolled = (
                kernel_reach(
                    transposed, act.shape[act.dim() - spatial:], out_map, weight.shape[2:],
                    argument(args, kwargs, 3, "stride", 1), argument(args, kwargs, 4, "padding", 0),
                    argument(args, kwargs, 7 if transposed else 5, "dilation", 1),
                ),
                out_map.numel(),
            )
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
        current = self.uses_of([weight], op, reads, what, out_dim, in_dim, groups, 1, rows, unrolled)
        channels = self.synapse_channels(op, weight, act, act_info, out_dim, in_dim, groups, outs[0])
        for o in outs:
            fitted = tuple(labels)[: o.dim()] + (None,) * max(0, o.dim() - len(labels))
            self.tag(o, Info(current, (), fitted, channels))
        return True

    def synapse_channels(self, op: str, weight: Tensor, act: Tensor, info: Info, out_dim, in_dim, groups: int, out: Tensor) -> object:
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
        result = tuple(frozenset().union(*(sets[i] for i in range(matrix.shape[1]) if matrix[o, i])) for o in range(matrix.shape[0]))
        return (out.dim() - 1, result)

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
        self.tag(outs[0], Info(frozenset(), tuple(weights.items()), (None,) * outs[0].dim()))
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
        gates = RNN.get(name) or CELL[name]
        if name in CELL:
            x, hx, *params = args
            h = hx[0] if isinstance(hx, (tuple, list)) else hx
            readers = [(params[0], self.inside(self.acts(x)), gates), (params[1], self.inside(self.acts(h)), gates)]
        else:  # (input, [batch_sizes,] hx, params, ...): an LSTM's projection weight_hr has no gates
            lists = [a for a in args[1:] if isinstance(a, (list, tuple)) and a and all(isinstance(p, Tensor) for p in a)]
            params = next((a for a in lists if a[0].dim() == 2), [])
            hx = next(
                (a for a in args[1:] if isinstance(a, Tensor) and a.dim() >= 2 or (isinstance(a, (list, tuple)) and a is not params and a)),
                None,
            )
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
            self.tag(o, Info(frozenset(current), (), labels, channels))

    # neurons ---------------------------------------------------------------------------------------

    def kept(self, module: nn.Module) -> list[Tensor]:
        """The state a neuron module keeps: its buffers and the tensors among its attributes."""
        return [
            *(b for b in module._buffers.values() if isinstance(b, Tensor)),
            *(v for v in vars(module).values() if isinstance(v, Tensor)),
        ]

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
            if info is not None:
                self.tag(t, Info(info.acts | {own}, info.weights, info.labels, None))
            else:
                self.tag(t, Info(frozenset({own}), (), (None,) * t.dim()))
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
        reached = frozenset(
            t for t in reached if t[0] not in ("state", "own") or t[1] == population or self.result.populations[t[1]] != path
        )
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
            self.result.fans[population] = fan_of(entering, neuron_dim if neuron_dim is not None else spikes.dim() - 1, neurons)
        self.tag(spikes, Info(frozenset({("spikes", population)}), (), tuple(labels)))
        state_token = frozenset({("state", population)})
        for t in [*leaves[1:], *self.kept(module)]:
            if t is not spikes:
                self.tag(t, Info(state_token, (), self.info(t).labels if self.info(t) is not None else ()))

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
def unchanged(model: nn.Module) -> Iterator[None]:
    """Afterwards ``model`` is exactly as before: its parameters and buffers (their values, however
    written, and ``requires_grad``), its attributes (training modes, tensors a forward stored), the
    contents of its dicts and lists (submodules and hooks a forward may add), its generators'
    states, and the random states of torch, Python and numpy."""
    modules = list(model.modules())
    saved = state.snapshot(modules, attributes=True)
    values = [
        (t, t.detach().clone(), t.requires_grad)
        for m in modules
        for t in (*m._parameters.values(), *m._buffers.values())
        if isinstance(t, Tensor)
    ]
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
    before (see :func:`unchanged`), and nothing has gradients.

    Raises:
        ValueError: ``model`` holds a lazy module not initialized yet (run one forward first), or
            a tensor on the meta device.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its module, run eagerly
    lazy = [name for name, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise ValueError(
            f"{one_line(lazy[0])} is not initialized yet (a lazy module): run one forward pass of the model first, then trace it"
        )
    meta = [name for name, t in [("example", example), *model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(
            f"{one_line(meta[0])} is on the meta device: the trace computes, "
            "so materialize the model (model.to_empty(device=...)) and give a real example"
        )
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
    tracer.tag(example, Info(frozenset({INPUT}), (), labels, channels))
    tracer.result.channels = math.prod(size for size, letter in zip(example.shape, letters) if letter not in "bt")
    with unchanged(model), tracing(model), torch.no_grad(), contextlib.ExitStack() as hooks:
        for name, module in model.named_modules():
            hooks.enter_context(_watched(tracer, name, module, neurons.get(name) is module))
        with tracer:
            model(example)
            kept = _kept_between_calls(tracer, model, neurons)
            if kept:  # what one call leaves for the next: a second call shows what reads it
                tracer.note(
                    f"{', '.join(map(one_line, kept))} carries activations from one call to the next: read over two calls of the model"
                )
                model(example)
    return layers_over_time(tracer.result)


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


@contextlib.contextmanager
def _watched(tracer: _Tracer, name: str, module: nn.Module, neuron: bool) -> Iterator[None]:
    """Hooks that tell the tracer which module runs, and a neuron's calls."""

    if isinstance(module, parametrize.ParametrizationList):  # its output is the weight the forward reads, dims as its own
        owner, _, tensor_name = f".{name}".rpartition(".parametrizations.")
        weight_name = f"{owner[1:]}.{tensor_name}" if owner else tensor_name

        def computed(module, args, output):
            if isinstance(output, Tensor):
                tracer.tag(output, Info(weights=((weight_name, tuple(range(output.dim()))),), labels=(None,) * output.dim()))

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
