"""The cached pass: inside :meth:`Registry.cached <nwave_param.Registry.cached>`, every weight
of a registration computed once, at its first read, in the thread that opened the pass.

The property ``parametrize`` puts on a module's class reads this thread's open pass first
(:func:`read_in_pass`), so a time loop reading a weight many times costs a dictionary lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param._engine import hardening
from nwave_param._engine.plans import Shared
from nwave_param.core.parametrization import ChipConstraint
from nwave_param.core.settings import Registration, per_thread, settings_in_effect

__all__ = ["Pass", "Pending", "read_in_pass", "slot_key", "tracing"]


@contextlib.contextmanager
def tracing(model: nn.Module) -> Iterator[None]:
    """While a trace of ``model`` runs in this thread, each of its constraints returns the latent
    weight itself (its settings pinned at hardness 0 in this thread, and off any chip) and no pass
    serves it: the trace sees the Parameters the forward computes with."""
    constraints = [
        link
        for module in model.modules()
        if parametrize.is_parametrized(module)
        for chain in module.parametrizations.values()
        for link in chain
        if isinstance(link, ChipConstraint)
    ]
    registrations = {id(c.registration): c.registration for c in constraints}.values()
    pinned = per_thread.__dict__.setdefault("pinned", {})
    before = {registration: pinned.get(registration) for registration in registrations}
    slots = per_thread.__dict__.get("slots")
    for registration in registrations:
        pinned[registration] = [dataclasses.replace(registration.settings, hardness=0.0), 1]
    per_thread.slots, per_thread.tracing = {}, True
    try:
        yield
    finally:
        per_thread.slots, per_thread.tracing = slots if slots is not None else {}, False
        for registration, held in before.items():
            if held is None:
                pinned.pop(registration, None)
            else:
                pinned[registration] = held


class Pass:
    """One pass inside :meth:`Registry.cached <nwave_param.Registry.cached>`, in the thread that
    opened it: every weight of a registration computed once, and those whose only
    parametrization is nwave_param's hardened together (:func:`nwave_param._engine.hardening.harden_all`),
    at the first read, with the settings in effect then (:func:`settings_in_effect`).

    Its values sit in the thread's slots, keyed by each weight's property (see :func:`own_class`):
    a read costs a dictionary lookup, however often a time loop reads it, and a forward in another
    thread never sees them.  A ``harden()`` in this thread while the pass is open
    (:meth:`reset`) makes the next read compute them again."""

    def __init__(self, registration: Registration, holders: list[tuple[nn.Module, str, ChipConstraint, bool]]) -> None:
        self.registration = registration
        self.holders = holders
        self.keys = [slot_key(module, tensor_name) for module, tensor_name, _, _ in holders]
        self.index = {key: i for i, key in enumerate(self.keys)}
        self.shared = Shared()  # what the hardening leaves for the penalty of this pass
        self.slots: dict[object, object] = per_thread.__dict__.setdefault("slots", {})
        per_thread.__dict__.setdefault("passes", {})[registration] = self
        self.reset()

    def reset(self) -> None:
        """Compute every value again at the next read."""
        self.shared = Shared()
        pending = Pending(self)
        for key in self.keys:
            self.slots[key] = pending

    def compute(self, key: object) -> Tensor:
        """Compute the value of ``key``'s weight: all the weights the pass hardens together, or that
        one weight through its chain."""
        module, tensor_name, _, alone = self.holders[self.index[key]]
        if not alone:  # its chain computes it (other parametrizations, then nwave_param's)
            value = self.slots[key] = module.parametrizations[tensor_name]()
            return value
        settings = settings_in_effect(self.registration)
        spec, hardness = settings.spec, settings.hardness
        groups: dict[tuple[bool, bool], list[int]] = {}
        for i, (_, _, constraint, together) in enumerate(self.holders):
            if together:
                training = bool(spec.mismatch and hardness and constraint.training)
                groups.setdefault((constraint.on_chip, training), []).append(i)
        for (on_chip, training), members in groups.items():
            weights = [_original(*self.holders[i][:2]) for i in members]
            layouts = [self.holders[i][2].layout for i in members]
            if on_chip:  # what one chip holds, whatever the hardness and mode
                values = hardening.harden_all(weights, layouts, spec, 1.0, [self.holders[i][2].chip_mismatch for i in members])
            else:
                shared = self.shared if len(groups) == 1 else None
                values = hardening.harden_all(weights, layouts, spec, hardness, spec.mismatch if training else 0.0, shared)
            for i, value in zip(members, values):
                self.slots[self.keys[i]] = value
        return self.slots[key]

    def close(self) -> None:
        for key in self.keys:
            self.slots.pop(key, None)
        per_thread.passes.pop(self.registration, None)


class Pending:
    """In a slot: the pass has not computed this value yet."""

    __slots__ = ("current",)

    def __init__(self, current: Pass) -> None:
        self.current = current


def slot_key(module: nn.Module, tensor_name: str) -> object:
    """What a pass files ``module.<tensor_name>``'s value under: its property's own key."""
    return type(module).__dict__[tensor_name].fget.slot_key


def _original(module: nn.Module, tensor_name: str) -> Tensor:
    """``module.parametrizations[tensor_name].original``, read from the modules' dicts: once per
    weight per pass, where ``nn.Module.__getattr__`` would cost a microsecond each."""
    links = module._modules["parametrizations"]._modules[tensor_name]
    original = links._parameters.get("original")
    return original if original is not None else links.original


def read_in_pass(cls: type, tensor_name: str) -> None:
    """Make ``cls``'s property for ``tensor_name`` read this thread's open pass first, then
    parametrize's own getter (always under ``torch.compile``, which traces that one).  The
    class is the module's own (:func:`own_class`), so the property's key names this module's
    weight."""
    original = cls.__dict__[tensor_name]
    if getattr(original.fget, "slot_key", None) is not None:
        return
    key, getter = object(), original.fget

    def get(module: nn.Module) -> Tensor:
        if not torch.compiler.is_compiling():
            slots = getattr(per_thread, "slots", None)
            if slots:
                value = slots.get(key)
                if value is not None:
                    return value.current.compute(key) if type(value) is Pending else value
        return getter(module)

    get.slot_key = key
    setattr(cls, tensor_name, property(get, original.fset))
