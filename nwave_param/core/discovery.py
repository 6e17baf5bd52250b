"""Which weights of a model nwave_param tracks, and their names.

A weight is a parameter of 2 or more dims whose local name is ``weight``, starts with
``weight_`` or ends with ``_weight``/``_weights``, outside normalization layers and embeddings.
Names are dotted paths relative to the model they are read from, as ``named_parameters()``
gave them before registration (``fc.weight``, never ``fc.parametrizations.weight.original``).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param.core.chains import latent, links_before, originals
from nwave_param.core.neurons import neuron_modules
from nwave_param.core.parametrization import ChipConstraint
from nwave_param.core.state import chip_links, parse_original_key
from nwave_param.core.trace import layouts_read, trace
from nwave_param.errors import one_line
from nwave_param.layout import Layout, layout_of
from nwave_param.sharing import memory_sharing, overlap, storage_of

__all__ = [
    "Tracked",
    "constraints",
    "is_weight_name",
    "ruled",
    "select",
    "stated_for",
    "stated_layouts",
    "tied_holders",
    "trackable_weights",
]

# Weights of these modules are scales or lookup tables, not synapses.
_UNTRACKED_MODULES = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.Embedding,
    nn.EmbeddingBag,
)


class Tracked(NamedTuple):
    """One weight: ``getattr(module, tensor_name)``, named ``name`` in the model."""

    name: str
    module: nn.Module
    tensor_name: str


class Constrained(NamedTuple):
    """A weight carrying a :class:`ChipConstraint`."""

    name: str
    module: nn.Module
    tensor_name: str
    constraint: ChipConstraint

    def chain(self) -> nn.ModuleList:
        """The weight's parametrization chain, the constraint in it."""
        return self.module.parametrizations[self.tensor_name]

    def links_before(self) -> list[nn.Module]:
        """The parametrizations ahead of the constraint in the chain."""
        return links_before(self.module, self.tensor_name, self.constraint)

    def latent(self) -> Tensor:
        """The latent weight: what the constraint receives."""
        return latent(self.module, self.tensor_name, self.constraint)


def is_weight_name(local: str) -> bool:
    return local == "weight" or local.startswith("weight_") or local.endswith(("_weight", "_weights"))


def _dotted(path: str, local: str) -> str:
    return f"{path}.{local}" if path else local


def trackable_weights(model: nn.Module) -> list[Tracked]:
    """The weights nwave_param would track in ``model``, in ``named_parameters()`` order.

    A tied parameter is listed once; a weight that carries parametrizations is listed by its
    effective name.

    Args:
        model: the network.

    Returns:
        One :class:`Tracked` ``(name, module, tensor_name)`` per weight, the weight being
        ``getattr(module, tensor_name)``.

    Example::

        >>> [t.name for t in trackable_weights(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))]
        ['0.weight']
    """
    found: dict[str, Tracked] = {}
    for dotted, _ in model.named_parameters():
        path, _, local = dotted.rpartition(".")
        original = parse_original_key(dotted)
        if original is not None:  # an original of a parametrized tensor
            path, local = original[0].removesuffix("."), original[1]
        name = _dotted(path, local)
        if name in found or not is_weight_name(local):
            continue
        module = model.get_submodule(path)
        value = getattr(module, local)
        if isinstance(module, _UNTRACKED_MODULES) or (not nn.parameter.is_lazy(value) and value.dim() < 2):
            continue
        found[name] = Tracked(name, module, local)
    return list(found.values())


def constraints(model: nn.Module) -> Iterator[Constrained]:
    """Every weight of ``model`` carrying a :class:`ChipConstraint`, named relative to ``model``,
    in the order ``named_parameters()`` gave them before registration."""
    for path, module in model.named_modules():
        found = [(tensor_name, link) for tensor_name, _, link in chip_links(module)]
        order = {name: i for i, name in enumerate(found[0][1].parameter_order)} if found else {}
        for tensor_name, link in sorted(found, key=lambda item: order.get(item[0], len(order))):
            yield Constrained(_dotted(path, tensor_name), module, tensor_name, link)


def _warn_unreachable(model: nn.Module) -> None:
    """Warn about weight-like plain tensor attributes, which parametrize cannot reach, and about
    snnTorch's one-to-one recurrent weights (``all_to_all=False``: one ``V`` per neuron), which
    nwave_param does not track."""
    for path, module in model.named_modules():
        recurrent = getattr(module, "V", None)
        if not getattr(module, "all_to_all", True) and isinstance(recurrent, Tensor) and recurrent.dim() < 2:  # a matrix V may be tracked
            warnings.warn(
                f"{_dotted(path, 'V')} holds one-to-one recurrent synapses (all_to_all=False), which nwave_param does not "
                "track: their range, grid and mismatch go unchecked; use all_to_all=True to have the recurrent weight tracked",
                stacklevel=4,
            )
        for local, value in vars(module).items():
            if isinstance(value, Tensor) and is_weight_name(local) and value.dim() >= 2:
                warnings.warn(
                    f"{_dotted(path, local)} is a plain tensor attribute, not a Parameter: nwave_param cannot "
                    "track it; make it an nn.Parameter (or a buffer, if it never trains) to have it checked",
                    stacklevel=4,
                )


def patterns(exclude: str | Iterable[str]) -> tuple[str, ...]:
    """``exclude`` as a tuple of glob patterns; TypeError for anything but strings."""
    if isinstance(exclude, str):
        return (exclude,)
    found = tuple(exclude) if isinstance(exclude, Iterable) and not isinstance(exclude, bytes) else None
    if found is None or not all(isinstance(pattern, str) for pattern in found):
        raise TypeError(f"exclude takes a glob pattern (str) or several, got {exclude!r}")
    return found


def excluded(name: str, exclude: Iterable[str]) -> bool:
    """Whether the dotted ``name`` matches a glob of ``exclude``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)


def unmatched(exclude: Iterable[str], names: Iterable[str]) -> str | None:
    """What to say of the globs of ``exclude`` that match none of ``names`` (likely a typo); None if all match."""
    names = list(names)
    unused = [pattern for pattern in exclude if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]
    if not unused:
        return None
    return (
        f"exclude pattern{'s' if len(unused) > 1 else ''} {', '.join(map(repr, unused))} "
        f"match{'es' if len(unused) == 1 else ''} no trackable weight"
    )


def select(
    model: nn.Module,
    exclude: tuple[str, ...],
    example: Tensor | None = None,
    layouts: Mapping[str, Layout] | None = None,
    dims: str | None = None,
) -> list[tuple[Tracked, Layout]]:
    """The weights to track and their layouts, every check done before anything changes.

    With ``example``, the weights ``model(example)`` uses as synapses, whatever their names,
    each read as the forward reads it (:func:`~nwave_param.core.trace.layouts_read`); without, the
    weights :func:`trackable_weights` names, read by their module's type.  ``layouts`` states a
    weight's reading by hand (a dotted name or glob to a Layout), and tracks a Parameter of any
    name it matches."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        raise TypeError("register the model before torch.compile: reg = nwp.register(model), then compiled = torch.compile(model)")
    stated = stated_layouts(layouts)
    read: dict[str, tuple[Layout | None, object]] | None = None
    if example is not None:
        if not isinstance(example, Tensor):
            raise TypeError(f"example must be a tensor (the input of model(example)), got {type(example).__name__}")
        traced = trace(model, example, neuron_modules(model), dims)  # a neuron's recurrent weight reads its state
        for note in traced.notes:
            warnings.warn(note, stacklevel=3)
        read = layouts_read(traced, {name: tuple(p.shape) for name, p in _parameters(model).items() if not nn.parameter.is_lazy(p)})
        by_name = [t for t in trackable_weights(model) if t.name in read]
        unused = [t.name for t in trackable_weights(model) if t.name not in read]
        if unused:
            warnings.warn(f"not used as a synapse by model(example), so not tracked: {', '.join(map(one_line, unused))}", stacklevel=3)
        candidates = by_name + [_tracked(model, name) for name in read if name not in {t.name for t in by_name}]
    else:
        candidates = trackable_weights(model)
        named = {t.name for t in candidates}
        skipped = [
            name for name, p in _parameters(model).items()
            if not nn.parameter.is_lazy(p) and p.dim() >= 2 and name not in named and not stated_for(name, stated)
            and not isinstance(_tracked(model, name).module, _UNTRACKED_MODULES)
        ]
        if skipped:
            warnings.warn(
                f"not tracked, as their names are not a weight's: {', '.join(map(one_line, skipped))}; "
                "if the forward uses one as a synapse, "
                "pass example= (every weight the forward uses as one is then tracked) or name it in layouts=",
                stacklevel=3,
            )
    known = {t.name for t in candidates}
    matrices = [name for name, p in _parameters(model).items() if not nn.parameter.is_lazy(p) and p.dim() >= 2]
    candidates += [_tracked(model, name) for name in matrices if name not in known and stated_for(name, stated)]
    for pattern in stated:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in matrices):
            raise ValueError(
                f"layouts names {pattern!r}, which matches no Parameter of 2+ dims of {type(model).__name__} "
                "(names are dotted, as register lists them)"
            )
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no trackable weight (a parameter of 2+ dims named 'weight', 'weight_*', "
            "'*_weight' or '*_weights', outside norms and embeddings; pass example= to track every weight the "
            "forward uses as a synapse, or name one in layouts=)"
        )
    _warn_unreachable(model)
    unused = unmatched(exclude, [item.name for item in candidates])
    if unused:
        warnings.warn(unused, stacklevel=3)
    chosen = [c for c in candidates if not excluded(c.name, exclude)]
    if not chosen:
        names = ", ".join(c.name for c in candidates)
        raise ValueError(f"exclude={list(exclude)} excludes every trackable weight ({names})")
    values = [getattr(item.module, item.tensor_name) for item in chosen]
    devices = {str(value.device) for value in values if not nn.parameter.is_lazy(value)}
    if len(devices) > 1:
        raise ValueError(f"tracked weights live on several devices {sorted(devices)}: move the model to one device")
    selected = [(item, _layout(item, read, stated)) for item in chosen]
    _refuse_shared_memory(model, chosen)
    return selected


def _parameters(model: nn.Module) -> dict[str, Tensor]:
    """Every Parameter by the name users write, once (a tied one by its first name); a
    parametrized weight by its own name, as the tensor its chain stores (the last, for several)."""
    found: dict[str, Tensor] = {}
    seen: set[int] = set()
    for path, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # its tensors are its weight's, named below by the weight's name
        chained = list(module.parametrizations) if parametrize.is_parametrized(module) else []
        held = [(local, value) for local, value in module._parameters.items() if value is not None]
        held += [(tensor_name, originals(module, tensor_name)[-1]) for tensor_name in chained]
        for local, value in held:
            if id(value) not in seen:
                seen.add(id(value))
                found.setdefault(_dotted(path, local), value)
    return found


def _tracked(model: nn.Module, name: str) -> Tracked:
    path, _, local = name.rpartition(".")
    return Tracked(name, model.get_submodule(path), local)


def stated_layouts(layouts: Mapping[str, Layout] | None) -> dict[str, Layout]:
    """``layouts`` checked: dotted names or globs to Layouts."""
    if layouts is None:
        return {}
    if not isinstance(layouts, Mapping) or not all(isinstance(k, str) and isinstance(v, Layout) for k, v in layouts.items()):
        raise TypeError(f"layouts maps dotted weight names (or globs) to nwp.Layout, got {layouts!r}")
    return dict(layouts)


def stated_for(name: str, stated: Mapping[str, Layout]) -> Layout | None:
    """The layout ``stated`` gives ``name``; ValueError when two of its globs give it two."""
    found = {layout for pattern, layout in stated.items() if fnmatch.fnmatchcase(name, pattern)}
    if len(found) > 1:
        raise ValueError(f"layouts gives {name} two readings ({', '.join(map(repr, found))}): one weight is read one way")
    return found.pop() if found else None


def _layout(item: Tracked, read: Mapping | None, stated: Mapping[str, Layout]) -> Layout:
    """The weight's layout: as the forward reads it, as ``layouts`` states it, or by its module's
    type (said in a warning where that type has no rule); raises if nwave_param cannot track it."""
    value = getattr(item.module, item.tensor_name)
    if nn.parameter.is_lazy(value):
        raise ValueError(f"{item.name} is not initialized yet (a lazy module): run one forward pass first")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{item.name} has dtype {value.dtype}; nwave_param tracks floating-point weights only")
    if value.is_meta:
        raise ValueError(f"{item.name} is on the meta device: materialize the model before registering")
    by_hand = stated_for(item.name, stated)
    traced, use = (read or {}).get(item.name, (None, None))
    if by_hand is not None and traced is not None and by_hand != traced:
        raise ValueError(
            f"{one_line(item.name)}: layouts states {by_hand}, but the forward reads it with {traced} "
            f"({one_line(use.describe())}): state what it computes"
        )
    layout = by_hand or traced
    if layout is None:
        layout = layout_of(item.module, item.tensor_name)
        if use is not None and use.outputs is not None:
            warnings.warn(
                f"{one_line(item.name)}: the forward reads it through {one_line(use.describe())}, which no Layout states; read as "
                f"{layout}, so its blocks are not the forward's: store it as [out, in] or [in, out]",
                stacklevel=4,
            )
        elif use is not None:
            warnings.warn(
                f"{one_line(item.name)}: the forward reads it through {one_line(use.describe())}, which does not say which dim indexes "
                f"the output neurons; read as {layout}; state it with layouts={{{item.name!r}: nwp.Layout(...)}}",
                stacklevel=4,
            )
        elif read is None and not _ruled(item.module):
            shown = "[out, in]: dim 0 indexes the output neurons, as F.linear reads it"
            warnings.warn(
                f"{one_line(item.name)} is a Parameter of {type(item.module).__name__}, whose reading nwave_param does not know: read as "
                f"{shown if value.dim() == 2 else 'dim 0 indexing the output neurons'}; if the forward computes x @ {item.tensor_name} "
                f"(the chip vendor's [in, out]), say so with layouts={{{item.name!r}: nwp.Layout(inputs_first=True)}}, or let "
                "nwave_param read it: nwp.register(model, example=x)",
                stacklevel=4,
            )
    layout.check(value.shape, item.name)
    return layout


def ruled(model: nn.Module, name: str) -> bool:
    """Whether nwave_param knows how the module holding Parameter ``name`` reads it (True for a
    name that is no Parameter of ``model``: nothing to state)."""
    module_path, _, tensor_name = name.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return True
    return not isinstance(getattr(module, tensor_name, None), Tensor) or _ruled(module)


def _ruled(module: nn.Module) -> bool:
    """Whether nwave_param knows how ``module``'s type reads its weights: torch's layers, snnTorch's
    and Norse's neurons, and a module that says it (``chip_layout``)."""
    cls = parametrize.type_before_parametrizations(module)
    torch_layers = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase, nn.modules.rnn.RNNCellBase)
    if issubclass(cls, torch_layers) or callable(getattr(module, "chip_layout", None)):
        return True
    return cls.__module__.partition(".")[0] in ("snntorch", "norse")  # without importing them


def _refuse_shared_memory(model: nn.Module, chosen: list[Tracked]) -> None:
    """Refuse a tracked weight whose elements share memory with each other (an expanded tensor),
    or with another Parameter that is not the same one (two overlapping views of one tensor): the
    chip holds one value per synapse, and projecting one would change the other.  Parameters that
    share a storage without overlapping (cuDNN's flattened RNN weights) are fine."""
    stored = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    by_storage: dict[tuple, list[Tensor]] = {}
    for _name, p in model.named_parameters():
        where = storage_of(p)
        if where is not None:
            by_storage.setdefault(where, []).append(p)
    for item in chosen:
        parametrized = item.tensor_name in getattr(item.module, "parametrizations", {})
        values = originals(item.module, item.tensor_name) if parametrized else [item.module._parameters[item.tensor_name]]
        sharing = memory_sharing(values[0]) if len(values) == 1 else None
        if sharing:
            raise ValueError(f"{item.name} {sharing}: the chip holds one value per synapse; store it with .contiguous() before registering")
        for value, other in ((v, o) for v in values for o in by_storage.get(storage_of(v), ())):
            if other is not value and overlap(value, other):
                raise ValueError(
                    f"{item.name} and {_dotted_effective(stored[id(other)])} are different Parameters over overlapping memory "
                    "(views of one tensor): projecting one would change the other; make each its own tensor (.clone()) before registering"
                )


def _dotted_effective(name: str) -> str:
    """A parameter's dotted name as the model's users write it: ``fc.weight``, not its parametrization's original."""
    original = parse_original_key(name)
    return original[0] + original[1] if original is not None and original[2] == "original" else name


def tied_holders(model: nn.Module, selected: list[tuple[Tracked, Layout]]) -> list[tuple[nn.Module, str, Layout]]:
    """``(module, tensor_name, layout)`` for each selected weight and every other module holding
    the same Parameter: a tied weight gets a constraint in each holder, so that every module
    computes with the hardened value (the registry counts it once).

    Raises:
        ValueError: the holders of one Parameter read it with different layouts (a Linear and a
            GRUCell): one value cannot be what the chip holds for both; both holders named.
    """
    params = {id(p): p for item, _ in selected if (p := item.module._parameters.get(item.tensor_name)) is not None}
    tied: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for path, module in model.named_modules():
        for tensor_name, value in module._parameters.items():
            if value is not None and id(value) in params:
                tied.setdefault(id(value), []).append((_dotted(path, tensor_name), module, tensor_name))
    holders = []
    for item, layout in selected:
        param = item.module._parameters.get(item.tensor_name)
        if param is None:  # already parametrized: the chain is the weight's only holder
            holders.append((item.module, item.tensor_name, layout))
            continue
        for name, module, tensor_name in tied[id(param)]:
            theirs = layout if module is item.module else layout_of(module, tensor_name)
            if theirs != layout:
                raise ValueError(
                    f"{item.name} and {name} hold one Parameter but read it with different layouts ({layout} and "
                    f"{theirs}): the chip holds a different value for each; untie them, or exclude {item.name!r}"
                )
            holders.append((module, tensor_name, layout))
    return holders
