"""Registering the chip constraint on a model, and the Registry that aggregates it.

Lifecycle, modelled on ``torch.ao.pruning``'s sparsifier::

    reg = register(model)                    # prepare: one ChipConstraint per tracked weight
    loss = task_loss + reg.penalty()         # train: the penalties steer toward the chip
    reg.remove()                             # the model exactly as it was before registration
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functional, kernels
from .functional import Penalties
from .layout import Layout, layout_of
from .parametrization import ChipConstraint
from .report import Report, build_report
from .spec import ChipSpec

__all__ = ["AlreadyRegisteredError", "Registry", "register", "registry_of", "trackable_weights"]

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


class AlreadyRegisteredError(ValueError, RuntimeError):
    """The model already carries nwave_param constraints."""


class Tracked(NamedTuple):
    """One tracked weight: ``getattr(module, tensor_name)`` under the dotted ``name``."""

    name: str
    module: nn.Module
    tensor_name: str


class _Entry(NamedTuple):
    module: nn.Module
    tensor_name: str
    constraint: ChipConstraint


def _is_weight_name(local: str) -> bool:
    return local == "weight" or local.startswith("weight_") or local.endswith(("_weight", "_weights"))


def trackable_weights(model: nn.Module) -> list[Tracked]:
    """The weights nwave_param tracks in ``model``, in ``named_parameters()`` order.

    A weight is a parameter of 2 or more dims whose local name is ``weight``, starts with
    ``weight_`` or ends with ``_weight``/``_weights``, outside normalization layers and
    embeddings.  A tied parameter is listed once; a weight that carries parametrizations is
    listed by its effective name (``fc.weight``, not ``fc.parametrizations.weight.original``).
    """
    found: dict[str, Tracked] = {}
    for dotted, _ in model.named_parameters():
        path, _, local = dotted.rpartition(".")
        head, _, tail = path.rpartition(".")
        owner_path, _, marker = head.rpartition(".")
        if marker == "parametrizations" and local.startswith("original"):
            path, local = owner_path, tail  # an original of a parametrized tensor
        name = f"{path}.{local}" if path else local
        if name in found or not _is_weight_name(local):
            continue
        module = model.get_submodule(path)
        value = getattr(module, local)
        if isinstance(module, _UNTRACKED_MODULES) or (not nn.parameter.is_lazy(value) and value.dim() < 2):
            continue
        found[name] = Tracked(name, module, local)
    return list(found.values())


def _warn_unreachable(model: nn.Module) -> None:
    """Warn about weight-like plain tensor attributes: parametrize cannot reach them."""
    for path, module in model.named_modules():
        for local, value in vars(module).items():
            if isinstance(value, Tensor) and _is_weight_name(local) and value.dim() >= 2:
                name = f"{path}.{local}" if path else local
                warnings.warn(
                    f"{name} is a plain tensor attribute, not a Parameter: nwave_param cannot track it; "
                    "make it an nn.Parameter (or a buffer, if it never trains) to have it checked",
                    stacklevel=4,
                )


def _check_weight(item: Tracked) -> Layout:
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


def _patterns(exclude: str | Iterable[str]) -> tuple[str, ...]:
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"exclude takes glob patterns (str), got {pattern!r}")
    return patterns


def _scale(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _power(power: int) -> int:
    if isinstance(power, bool) or power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    return int(power)


def _select(model: nn.Module, exclude: tuple[str, ...]) -> list[tuple[Tracked, Layout]]:
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
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(item.name, pattern) for item in candidates):
            warnings.warn(f"exclude pattern {pattern!r} matches no trackable weight", stacklevel=3)
    chosen = [c for c in candidates if not any(fnmatch.fnmatchcase(c.name, p) for p in exclude)]
    if not chosen:
        names = ", ".join(c.name for c in candidates)
        raise ValueError(f"exclude={list(exclude)} excludes every trackable weight ({names})")
    values = [getattr(item.module, item.tensor_name) for item in chosen]
    devices = {str(value.device) for value in values if not nn.parameter.is_lazy(value)}
    if len(devices) > 1:
        raise ValueError(f"tracked weights live on several devices {sorted(devices)}: move the model to one device")
    return [(item, _check_weight(item)) for item in chosen]


def _engine():
    """The fast kernels, or the plain formula inside ``torch.compile`` (which fuses it itself)."""
    return functional.reference_engine if torch.compiler.is_compiling() else kernels.engine


def compute_penalties(weights: list[Tensor], layouts: list[Layout], spec: ChipSpec, power: int) -> Penalties:
    """The penalties of ``weights``, as the registry and the functional forms compute them."""
    return functional.penalties(weights, layouts, spec.limit, power, spec.group_size, engine=_engine())


def _constraints(model: nn.Module) -> Iterator[_Entry]:
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                for link in chain:
                    if isinstance(link, ChipConstraint):
                        yield _Entry(module, tensor_name, link)


def _load_plain_keys(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """load_state_dict pre-hook: a plain checkpoint key ``fc.weight`` fills ``fc.parametrizations.weight.original``."""
    for tensor_name, chain in module.parametrizations.items():
        if len(chain) == 1 and isinstance(chain[0], ChipConstraint):
            plain, original = prefix + tensor_name, f"{prefix}parametrizations.{tensor_name}.original"
            if plain in state_dict and original not in state_dict:
                state_dict[original] = state_dict.pop(plain)


def _remove_hook(module: nn.Module) -> None:
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", None) is _load_plain_keys]:
        del hooks[key]


def _restore_order(module: nn.Module, order: tuple[str, ...]) -> None:
    """Re-insert ``module._parameters`` in its pre-registration order (parametrize appends)."""
    params = module._parameters
    for key in [k for k in order if k in params] + [k for k in params if k not in order]:
        params[key] = params.pop(key)


_DIRECT = "_nwave_param_direct_"


def _direct_getter(tensor_name: str, injected: property):
    key = _DIRECT + tensor_name

    def get(module: nn.Module) -> Tensor:
        weight = module.__dict__.get(key)
        # a deepcopy made before the context shares the class but not the entry: parametrize's way
        return injected.fget(module) if weight is None else weight

    get.nwave_param_direct = True
    return get


def _read_directly(entry: _Entry, chain: nn.Module):
    """Inside ``Registry.cached()``: let ``module.<tensor_name>`` return the Parameter itself.

    Parametrize injects a property into the module's own class; while the context lasts that
    property is replaced by a getter reading the module's ``__dict__`` (a deepcopy shares the
    class: a copy made inside reads its own entry, one made before falls back to parametrize).  Returns what to restore, or None where this does not apply (other
    parametrizations in the chain, or an enclosing context already did it).
    """
    cls, tensor_name = type(entry.module), entry.tensor_name
    injected = cls.__dict__.get(tensor_name)
    if len(chain) != 1 or not isinstance(injected, property) or getattr(injected.fget, "nwave_param_direct", False):
        return None
    entry.module.__dict__[_DIRECT + tensor_name] = chain._parameters["original"]
    setattr(cls, tensor_name, property(_direct_getter(tensor_name, injected), injected.fset))
    return entry.module, tensor_name, injected


def _write_through_chain(module: nn.Module, tensor_name: str, value: Tensor, layout: Layout, spec: ChipSpec) -> None:
    """Assign a projected value through the chain's right_inverse.  The chain's forward may round
    it an ulp past the limit (weight_norm's g * v / |v|): project again a few ulps inside."""
    bound, tiny = spec.limit, torch.finfo(value.dtype).eps * spec.limit
    for attempt in range(8):
        setattr(module, tensor_name, value)
        effective = getattr(module, tensor_name)
        inside = bool(effective.abs().max() <= functional.limit_in(effective.dtype, spec.limit)) if effective.numel() else True
        if inside and not bool(functional.mixed_blocks(effective, layout, spec.group_size).any()):
            return
        bound -= tiny * 2**attempt
        value = functional.project(effective, layout, bound, spec.group_size)


def register(
    model: nn.Module,
    spec: ChipSpec | None = None,
    *,
    alpha: float = 1.0,
    lam: float = 1.0,
    power: int = 2,
    exclude: str | Iterable[str] = (),
) -> Registry:
    r"""Track every weight of ``model`` against the chip's constraints.

    Registers a :class:`~nwave_param.ChipConstraint` (an identity parametrization, last in any
    existing chain) on each trackable weight (see :func:`trackable_weights`), except those whose
    dotted name matches a glob in ``exclude``.  The model computes exactly what it did before;
    add :meth:`Registry.penalty` (:math:`\alpha \cdot` magnitude :math:`+ \lambda \cdot`
    topology) to the loss.

    Example::

        >>> model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 2))
        >>> reg = register(model, exclude="2.*")
        >>> reg.names
        ['0.weight']
        >>> loss = model(torch.randn(4, 8)).sum() + reg.penalty()

    Raises:
        ValueError: no trackable weight, ``exclude`` leaves none, a bad ``alpha``/``lam``/``power``,
            a weight on the meta device, several devices, or a shape its layer type cannot have.
        TypeError: a tracked weight that is not floating point; ``spec`` not a ChipSpec.
        AlreadyRegisteredError: the model already carries nwave_param constraints
            (use :func:`registry_of`, or :meth:`Registry.remove` first).
    """
    spec = ChipSpec() if spec is None else spec
    if not isinstance(spec, ChipSpec):
        raise TypeError(f"spec must be a ChipSpec or None, got {type(spec).__name__}")
    alpha, lam, power = _scale("alpha", alpha), _scale("lam", lam), _power(power)
    if isinstance(model, nn.Module):
        present = sorted({entry.constraint.name for entry in _constraints(model)})
        if present:
            raise AlreadyRegisteredError(
                f"the model already carries nwave_param constraints on {', '.join(present)}: "
                "use nwp.registry_of(model), or call .remove() on it before registering again"
            )
    selected = _select(model, _patterns(exclude))
    orders = {id(item.module): tuple(item.module._parameters) for item, _ in selected}

    entries: list[_Entry] = []
    try:
        for index, (item, layout) in enumerate(selected):
            constraint = ChipConstraint(
                item.name, index, layout, spec, alpha, lam, power, orders[id(item.module)]
            )
            parametrize.register_parametrization(item.module, item.tensor_name, constraint)
            if not any(entry.module is item.module for entry in entries):
                item.module.register_load_state_dict_pre_hook(_load_plain_keys)
            entries.append(_Entry(item.module, item.tensor_name, constraint))
    except BaseException:
        if entries:
            Registry(entries).remove()
        raise
    return Registry(entries)


def registry_of(model: nn.Module) -> Registry:
    """The :class:`Registry` of ``model``, rebuilt from its constraints alone.

    Works on a ``copy.deepcopy`` of a registered model, in each DDP process
    (``registry_of(ddp.module)``) and after ``load_state_dict``.

    Raises:
        LookupError: ``model`` carries no nwave_param constraint.
    """
    entries = list(_constraints(model))
    if not entries:
        raise LookupError(f"{type(model).__name__} carries no nwave_param constraint: call nwp.register(model)")
    return Registry(entries)


class Registry:
    """The tracked weights of one model: penalties, caching and removal.

    A view over the model's :class:`~nwave_param.ChipConstraint` objects; build one with
    :func:`register` or :func:`registry_of`, not directly.
    """

    def __init__(self, entries: Iterable[_Entry]) -> None:
        self._entries = tuple(sorted(entries, key=lambda e: e.constraint.index))
        first = self._entries[0].constraint
        config = (first.spec, first.alpha, first.lam, first.power)
        for entry in self._entries:
            c = entry.constraint
            if (c.spec, c.alpha, c.lam, c.power) != config:
                raise ValueError(
                    f"{c.name} and {first.name} were registered with different settings: "
                    "a model holds one registration; remove one of them"
                )
        self.spec: ChipSpec = first.spec
        self.alpha: float = first.alpha
        self.lam: float = first.lam
        self.power: int = first.power
        self._layouts = [e.constraint.layout for e in self._entries]
        self._chains = [e.module.parametrizations[e.tensor_name] for e in self._entries]
        self._removed = False

    @property
    def names(self) -> list[str]:
        """Dotted names of the tracked weights, as ``model.named_parameters()`` gave them before registration."""
        return [entry.constraint.name for entry in self._entries]

    def weights(self) -> list[Tensor]:
        """The tracked weights' effective values, differentiable (the Parameters themselves where possible)."""
        if self._removed:
            raise RuntimeError("this registry was removed; register the model again to track it")
        # On the hot path of every training step: read the chains directly, no module lookups.
        return [
            chain._parameters["original"] if len(chain) == 1 else getattr(entry.module, entry.tensor_name)
            for chain, entry in zip(self._chains, self._entries)
        ]

    def penalties(self) -> Penalties:
        """``Penalties(magnitude, topology)``: unscaled, each divided by the number of tracked elements."""
        return compute_penalties(self.weights(), self._layouts, self.spec, self.power)

    def penalty(self) -> Tensor:
        r""":math:`\alpha \cdot` magnitude :math:`+ \lambda \cdot` topology: a 0-dim differentiable tensor to add to the loss."""
        spec = self.spec
        return functional.penalty(
            self.weights(), self._layouts, spec.limit, self.power, spec.group_size, self.alpha, self.lam, engine=_engine()
        )

    def report(self) -> Report:
        """A :class:`~nwave_param.report.Report`: one row per tracked weight; the rows sum to :meth:`penalties`."""
        return build_report(self.names, self.weights(), self._layouts, self.spec, self.power)

    def is_mappable(self) -> bool:
        """True exactly when every tracked weight is finite, ``max |w| <= limit`` and no block column is mixed."""
        return self.report().is_mappable

    @torch.no_grad()
    def project_(self) -> Registry:
        """Move the weights, in place, to the L1-nearest point the chip can hold; returns ``self``.

        Clamps every weight into ``[-limit, limit]``, then in each block column zeroes the sign
        with the smaller L1 mass (a tie keeps the positive side); see
        :func:`nwave_param.functional.project`.  Idempotent; a mappable weight is left bit-identical.
        Parameters are updated in place, so optimizers keep working.

        Raises:
            ValueError: a weight holds NaN or infinite values (named; nothing is changed).
        """
        self._check_live()
        weights = self.weights()
        broken = [name for name, w in zip(self.names, weights) if not bool(torch.isfinite(w).all())]
        if broken:
            raise ValueError(
                f"cannot project non-finite weights {', '.join(broken)}: nothing was changed; "
                "fix or re-initialize them first"
            )
        one_way = [
            entry.constraint.name
            for entry, chain in zip(self._entries, self._chains)
            if not all(hasattr(link, "right_inverse") for link in chain)
        ]
        if one_way:
            raise ValueError(
                f"cannot project {', '.join(one_way)}: a parametrization in its chain has no right_inverse, "
                "so the projected value cannot be written back; nothing was changed"
            )
        spec = self.spec
        projected = [functional.project(w, lay, spec.limit, spec.group_size) for w, lay in zip(weights, self._layouts)]
        for (module, tensor_name, _), weight, value, layout in zip(self._entries, weights, projected, self._layouts):
            if len(module.parametrizations[tensor_name]) == 1:
                weight.copy_(value)
            else:
                _write_through_chain(module, tensor_name, value, layout, spec)
        return self

    @contextlib.contextmanager
    def cached(self) -> Iterator[None]:
        """Context manager: each weight is evaluated once, however often a time loop reads it.

        Wrap the forward of a recurrent net: ``with reg.cached(): out = model(x)``.  Inside,
        ``parametrize.cached()`` holds for every parametrized tensor, and a weight whose only
        parametrization is nwave_param's is read straight from the module: a time loop reads it
        as fast as an unregistered Parameter.
        """
        with parametrize.cached():
            swapped = [swap for entry, chain in zip(self._entries, self._chains) if (swap := _read_directly(entry, chain))]
            try:
                yield
            finally:
                for module, tensor_name, injected in swapped:
                    setattr(type(module), tensor_name, injected)
                    del module.__dict__[_DIRECT + tensor_name]

    def remove(self) -> None:
        """Remove every constraint: module classes, parameters, state_dict keys and their order as before registration.

        Raises:
            RuntimeError: already removed, or a constraint was removed by hand (nothing is changed;
                ``registry_of(model).remove()`` removes the remaining ones).
        """
        self._check_live()
        for module, tensor_name, constraint in self._entries:
            chain = module.parametrizations[tensor_name]
            if len(chain) == 1:
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
            else:
                del chain[next(i for i, link in enumerate(chain) if link is constraint)]
        owners = {id(e.module): e for e in self._entries}.values()
        for module, _, constraint in owners:
            _remove_hook(module)
            _restore_order(module, constraint.parameter_order)
        self._removed = True

    def _check_live(self) -> None:
        self.weights()  # raises once removed
        gone = [
            e.constraint.name
            for e in self._entries
            if not parametrize.is_parametrized(e.module, e.tensor_name)
            or not any(link is e.constraint for link in e.module.parametrizations[e.tensor_name])
        ]
        if gone:
            raise RuntimeError(
                f"the constraint on {', '.join(gone)} was removed outside this registry; "
                "use nwp.registry_of(model) for the ones that remain"
            )

    def __repr__(self) -> str:
        return (
            f"Registry({len(self._entries)} weights, {self.spec}, alpha={self.alpha}, "
            f"lam={self.lam}, power={self.power})"
        )
