"""A class of its own for every module that carries a constraint, so that copies stay independent.

``parametrize`` puts a weight's property on a class made for the module, and ``copy.deepcopy``
gives the copy that same class, so removing a parametrization from one would delete the
property from both, and ``parametrize.cached()`` keys its cache by the module the property was
made for, so a copy and its original would read each other's cached weights.  A module carrying
a :class:`~nwave_param.core.parametrization.ChipConstraint` therefore gets a class of its own
(:func:`own_class`), and so does each deepcopy of it; it refuses pickling (save its state_dict).
"""

from __future__ import annotations

import copy
import weakref

from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param.core.parametrization import ChipConstraint
from nwave_param.core.passes import read_in_pass

__all__ = ["attach", "detach", "own_class", "owns_class", "restore_class"]


def _deepcopy(self: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a module with its own class: the copy gets a class of its own too."""
    replica = memo.get(id(self))
    if replica is not None:
        return replica
    cls = type(self)
    replica = cls.__new__(cls)
    memo[id(self)] = replica
    state = {key: _without_graph(value) for key, value in self.__dict__.items()}
    replica.__dict__ = copy.deepcopy(state, memo)
    own_class(replica)
    return replica


def _without_graph(value: object) -> object:
    """``value`` with computed tensors detached: a graph cannot be copied.  torch's RNNs cache the
    weights their last forward read in ``_flat_weights``; with a hardened weight, those are
    computed from the latent ones (the copy recomputes its own on its first forward)."""
    if isinstance(value, Tensor) and value.grad_fn is not None:
        return value.detach()
    if type(value) in (list, tuple) and any(isinstance(v, Tensor) and v.grad_fn is not None for v in value):
        return type(value)(_without_graph(v) for v in value)
    return value


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
        read_in_pass(module.__class__, tensor_name)


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
    read_in_pass(module.__class__, tensor_name)


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
