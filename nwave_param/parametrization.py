r"""The parametrization: a weight's chip constraint, and what the network computes with.

:class:`ChipConstraint` is registered with ``torch.nn.utils.parametrize`` on each tracked weight,
last in any existing chain.  For the latent weight :math:`w` (the Parameter, or what earlier
parametrizations make of it) ``module.weight`` returns

.. math:: w_\text{eff} = w + h\,(\mathrm{chip}(w) - w)

with the registration's hardness :math:`h \in [0, 1]` and a straight-through gradient; at
:math:`h = 0` it is :math:`w` itself, the same tensor object.

Copies stay independent.  ``parametrize`` puts a weight's property on a class made for the
module, and ``copy.deepcopy`` gives the copy that same class, so removing a parametrization from
one would delete the property from both, and ``parametrize.cached()`` keys its cache by the
module the property was made for, so a copy and its original would read each other's cached
weights.  A module carrying a :class:`ChipConstraint` therefore gets a class of its own (see
:func:`own_class`), and so does each deepcopy of it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import functional
from .layout import Layout
from .spec import ChipSpec

__all__ = ["ChipConstraint", "Settings", "describe", "read_description", "same_description"]


def check_scale(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_hardness(value: object) -> float:
    """``value`` as a float in [0, 1]; TypeError for a bool or non-number, ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"hardness must be a real number in [0, 1], got {value!r} ({type(value).__name__})")
    if not 0 <= value <= 1:  # NaN fails too
        raise ValueError(f"hardness must be in [0, 1], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Settings:
    """One registration's configuration, shared by all of its constraints.

    Frozen: a change (:meth:`Registry.harden <nwave_param.Registry.harden>`) replaces the object
    on every constraint at once, so the constraints never disagree.
    """

    spec: ChipSpec
    alpha: float = 1.0
    lam: float = 1.0
    power: int = 2
    hardness: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.spec, ChipSpec):
            raise TypeError(f"spec must be a ChipSpec or None, got {type(self.spec).__name__}")
        object.__setattr__(self, "alpha", check_scale("alpha", self.alpha))
        object.__setattr__(self, "lam", check_scale("lam", self.lam))
        if isinstance(self.power, bool) or self.power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {self.power!r}")
        object.__setattr__(self, "power", int(self.power))
        object.__setattr__(self, "hardness", check_hardness(self.hardness))


FORMAT = "nwave_param/1"  # marks nwave_param's extra state; bumped if its content changes


def describe(layout: Layout, spec: ChipSpec) -> dict:
    """The extra state of a constraint: JSON-ready, loadable with ``weights_only=True``."""
    return {
        "format": FORMAT,
        "layout": layout.to_dict(),
        "spec": {"limit": spec.limit, "group_size": spec.group_size, "bits": spec.bits, "mismatch": spec.mismatch},
    }


def read_description(state: object) -> tuple[Layout, ChipSpec] | None:
    """``(layout, spec)`` from a value :func:`describe` wrote, None for anything else."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        return None
    try:
        return Layout.from_dict(dict(state["layout"])), ChipSpec(**dict(state["spec"]))
    except (KeyError, TypeError, ValueError):
        return None


def same_description(saved: tuple[Layout, ChipSpec] | None, layout: Layout, spec: ChipSpec) -> bool:
    """Whether a saved description holds for ``layout`` and ``spec``.  The mismatch is left out:
    it says how the chip varies, not what a weight is (a model trained with mismatch may be
    evaluated without it)."""
    return saved is not None and saved[0] == layout and dataclasses.replace(saved[1], mismatch=0.0) == dataclasses.replace(spec, mismatch=0.0)


class ChipConstraint(nn.Module):
    r"""The chip constraint of one weight: :math:`w \mapsto w + h\,(\mathrm{chip}(w) - w)`.

    ``chip(w)`` is what :meth:`Registry.project_ <nwave_param.Registry.project_>` would write
    (:func:`nwave_param.functional.chip`); the gradient passes straight through to :math:`w`.
    At hardness 0 the forward returns its input, the same tensor object: the model computes
    bit-identical outputs, in-place init reaches the weight and no memory is added.

    It holds what its forward needs (the layout and the shared :class:`Settings`) and the owning
    module's parameter order, so that removal restores the state_dict key order.  It adds no
    parameters or buffers; the hardness is not saved in the state_dict.

    Example::

        >>> from torch.nn.utils import parametrize
        >>> fc = nn.Linear(2, 3, bias=False)
        >>> _ = parametrize.register_parametrization(fc, "weight", ChipConstraint(Layout(), Settings(ChipSpec())))
        >>> fc.weight is fc.parametrizations.weight.original
        True
    """

    def __init__(self, layout: Layout, settings: Settings, parameter_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.layout = layout
        self.settings = settings
        self.parameter_order = parameter_order
        # Registry.on_chip: one chip instance, its mismatch sample (or None); plain attributes,
        # which torch.compile guards, and which a copy does not take (see __getstate__)
        self.on_chip = False
        self.chip_mismatch: Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(on_chip=False, chip_mismatch=None)  # a copy made inside on_chip is not on a chip
        return state

    def forward(self, weight: Tensor) -> Tensor:
        spec, hardness = self.settings.spec, self.settings.hardness
        if self.on_chip:  # what one chip holds, whatever the hardness and mode
            return functional.harden(weight, self.layout, spec, 1.0, self.chip_mismatch)
        noise = None
        if spec.mismatch and hardness and self.training:  # a fresh mismatch sample per forward pass
            noise = torch.randn_like(weight).mul_(spec.mismatch)
        return functional.harden(weight, self.layout, spec, hardness, noise)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Identity, so assigning ``module.weight = value`` stores ``value`` as the latent weight."""
        return weight

    def get_extra_state(self) -> dict:
        """The layout and the spec, saved in the state_dict so that a checkpoint describes itself."""
        return describe(self.layout, self.settings.spec)

    def set_extra_state(self, state: object) -> None:
        if not same_description(read_description(state), self.layout, self.settings.spec):
            raise ValueError(f"a checkpoint's description {state!r} does not match this constraint ({self.extra_repr()})")

    def extra_repr(self) -> str:
        return f"{self.settings.spec}, {self.layout}, hardness={self.settings.hardness}"


# --- a class of its own for every module that carries a constraint ---------------------------


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a module with its own class: the copy gets a class of its own too."""
    replica = memo.get(id(self))
    if replica is not None:
        return replica
    cls = type(self)
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    replica.__dict__ = copy.deepcopy(self.__dict__, memo)
    own_class(replica)
    return replica


def _getstate(self: nn.Module):
    raise RuntimeError(
        "a module carrying nwave_param constraints cannot be pickled: save model.state_dict() "
        "(or nwp.plain_state_dict(model) for a plain model)"
    )


def owns_class(module: nn.Module) -> bool:
    """Whether ``module``'s class was made by :func:`own_class` for this very module."""
    owner = type(module).__dict__.get("_nwave_param_owner")
    return owner is not None and owner() is module


def own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a class of its own, with properties bound to it.

    The new class derives from the class before parametrization, holds parametrize's
    ``__getstate__`` guard and a ``__deepcopy__`` that repeats this for the copy, and remembers
    the class it replaced, so that :func:`restore_class` can put that back.
    """
    current = type(module)
    base = parametrize.type_before_parametrizations(module)
    namespace = {
        key: value
        for key, value in vars(current).items()
        if not isinstance(value, property) and key not in ("__dict__", "__weakref__")
    }
    namespace.update(
        __deepcopy__=_deepcopy,
        __getstate__=_getstate,
        _nwave_param_owner=weakref.ref(module),
        _nwave_param_replaced=current.__dict__.get("_nwave_param_replaced", current),
    )
    module.__class__ = type(current.__name__, (base,), namespace)
    for tensor_name in module.parametrizations:
        parametrize._inject_property(module, tensor_name)  # PyTorch's own getter, bound to this module


def restore_class(module: nn.Module) -> None:
    """After removal, give back the class the module had before :func:`own_class`, when that
    class still describes it (its properties are exactly the remaining parametrized tensors)."""
    if not owns_class(module):
        return  # parametrize already restored the plain class
    replaced = type(module)._nwave_param_replaced
    properties = {key for key, value in vars(replaced).items() if isinstance(value, property)}
    if parametrize.is_parametrized(module) and properties == set(module.parametrizations):
        module.__class__ = replaced


def attach(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> None:
    """Register ``constraint`` on ``module.<tensor_name>``, last in any chain, on a class of the module's own."""
    if parametrize.is_parametrized(module) and not owns_class(module):
        own_class(module)  # parametrize would add the property to a class other modules may share
    parametrize.register_parametrization(module, tensor_name, constraint)
    if not owns_class(module):
        own_class(module)


def detach(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> None:
    """Remove ``constraint`` from ``module.<tensor_name>``; the latent weight stays as stored."""
    chain = module.parametrizations[tensor_name]
    if len(chain) == 1:
        if not owns_class(module):
            own_class(module)  # never delete a property from a class another module shares
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)
    else:
        del chain[next(i for i, link in enumerate(chain) if link is constraint)]
    restore_class(module)
