"""Which weights of a model nwave_param tracks, and their names.

A weight is a parameter of 2 or more dims whose local name is ``weight``, starts with
``weight_`` or ends with ``_weight``/``_weights``, outside normalization layers and embeddings.
Names are dotted paths relative to the model they are read from, as ``named_parameters()``
gave them before registration (``fc.weight``, never ``fc.parametrizations.weight.original``).
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from torch import Tensor, nn

from .layout import Layout, layout_of
from .parametrization import ChipConstraint, latent, links_before, originals
from .sharing import memory_sharing, overlap, storage_of
from .state import chip_links, parse_original_key

__all__ = ["Tracked", "constraints", "is_weight_name", "select", "tied_holders", "trackable_weights"]

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
    """Warn about weight-like plain tensor attributes: parametrize cannot reach them."""
    for path, module in model.named_modules():
        for local, value in vars(module).items():
            if isinstance(value, Tensor) and is_weight_name(local) and value.dim() >= 2:
                warnings.warn(
                    f"{_dotted(path, local)} is a plain tensor attribute, not a Parameter: nwave_param cannot "
                    "track it; make it an nn.Parameter (or a buffer, if it never trains) to have it checked",
                    stacklevel=4,
                )


def _layout(item: Tracked) -> Layout:
    """The weight's layout; raises if nwave_param cannot track it."""
    value = getattr(item.module, item.tensor_name)
    if nn.parameter.is_lazy(value):
        raise ValueError(f"{item.name} is not initialized yet (a lazy module): run one forward pass first")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{item.name} has dtype {value.dtype}; nwave_param tracks floating-point weights only")
    if value.is_meta:
        raise ValueError(f"{item.name} is on the meta device: materialize the model before registering")
    layout = layout_of(item.module, item.tensor_name)
    layout.check(value.shape, item.name)
    return layout


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
    return f"exclude pattern{'s' if len(unused) > 1 else ''} {', '.join(map(repr, unused))} match{'es' if len(unused) == 1 else ''} no trackable weight"


def select(model: nn.Module, exclude: tuple[str, ...]) -> list[tuple[Tracked, Layout]]:
    """The weights to track and their layouts, every check done before anything changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    candidates = trackable_weights(model)
    if not candidates:
        raise ValueError(
            f"{type(model).__name__} has no trackable weight (a parameter of 2+ dims named "
            "'weight', 'weight_*', '*_weight' or '*_weights', outside norms and embeddings)"
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
    selected = [(item, _layout(item)) for item in chosen]
    _refuse_shared_memory(model, chosen)
    return selected


def _refuse_shared_memory(model: nn.Module, chosen: list[Tracked]) -> None:
    """Refuse a tracked weight whose elements share memory with each other (an expanded tensor),
    or with another Parameter that is not the same one (two overlapping views of one tensor): the
    chip holds one value per synapse, and projecting one would change the other.  Parameters that
    share a storage without overlapping (cuDNN's flattened RNN weights) are fine."""
    stored = {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}
    by_storage: dict[tuple, list[Tensor]] = {}
    for name, p in model.named_parameters():
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
