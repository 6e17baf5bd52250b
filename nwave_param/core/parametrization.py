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

import contextlib
import copy
import dataclasses
import math
import numbers
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param._engine import hardening
from nwave_param import description, functional
from nwave_param.core.report import build_report
from nwave_param.layout import Layout
from nwave_param.spec import ChipSpec

__all__ = ["ChipConstraint", "Pass", "PinSettings", "Registration", "Settings"]


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
    """One registration's configuration: frozen, so a change is a new object (see :class:`Registration`)."""

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


class Registration:
    """What the constraints of one :func:`~nwave_param.register` call share.

    ``settings`` is replaced whole, by one assignment (:meth:`replace_settings`), so a reader in
    another thread sees every constraint with the old settings or every one with the new, never
    a mix; and a forward of the registered model reads them once, at its start
    (:class:`PinSettings`), so that it computes every weight with one hardness.  ``on_chip`` is
    whether a :meth:`Registry.on_chip <nwave_param.Registry.on_chip>` context holds the model; the
    lock makes entering one a single step.  A copy of the model gets a registration of its own.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.on_chip = False
        self.lock = threading.Lock()

    def replace_settings(self, settings: Settings) -> None:
        """Swap the settings; this thread's open pass (if any) recomputes at its next read."""
        self.settings = settings
        current = open_pass(self)
        if current is not None:
            current.reset()

    def __deepcopy__(self, memo: dict) -> Registration:
        return Registration(self.settings)  # a copy is never on a chip (see ChipConstraint.__getstate__)

    def __getstate__(self) -> dict:
        return {"settings": self.settings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["settings"])

    def __repr__(self) -> str:
        return f"Registration({self.settings})"


# What each thread computes with: the settings pinned by the forward it is in, and its open
# passes.  Per thread, so that a harden() or a cached() pass in one thread never reaches
# another thread's forward.
_threads = threading.local()


def settings_in_effect(registration: Registration) -> Settings:
    """The settings this thread computes with: those its running forward of the registered model
    started with (:class:`PinSettings`), else the registration's own."""
    if not torch.compiler.is_compiling():  # a compiled graph holds its settings as constants already
        pinned = getattr(_threads, "pinned", None)
        if pinned:
            held = pinned.get(registration)
            if held is not None:
                return held[0]
    return registration.settings


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
    pinned = _threads.__dict__.setdefault("pinned", {})
    before = {registration: pinned.get(registration) for registration in registrations}
    slots = _threads.__dict__.get("slots")
    for registration in registrations:
        pinned[registration] = [dataclasses.replace(registration.settings, hardness=0.0), 1]
    _threads.slots, _threads.tracing = {}, True
    try:
        yield
    finally:
        _threads.slots, _threads.tracing = slots if slots is not None else {}, False
        for registration, held in before.items():
            if held is None:
                pinned.pop(registration, None)
            else:
                pinned[registration] = held


class PinSettings:
    """A forward pre-hook and forward hook (always called) on the registered model: its forward
    computes every weight with the settings it started with.  A ``harden()`` from another thread
    takes effect at that thread's next forward, never in the middle of one.  Nested forwards of
    the same model keep the outermost one's settings."""

    def __init__(self, registration: Registration) -> None:
        self.registration = registration

    def before(self, module: nn.Module, args: tuple) -> None:
        if torch.compiler.is_compiling():
            return
        pinned = _threads.__dict__.setdefault("pinned", {})
        held = pinned.get(self.registration)
        if held is None:
            pinned[self.registration] = [self.registration.settings, 1]
        else:
            held[1] += 1

    def after(self, module: nn.Module, args: tuple, output: object) -> None:
        if torch.compiler.is_compiling():
            return
        pinned = getattr(_threads, "pinned", {})
        held = pinned.get(self.registration)
        if held is not None:
            held[1] -= 1
            if not held[1]:
                del pinned[self.registration]


def pin(model: nn.Module, registration: Registration) -> None:
    """Add :class:`PinSettings`'s hooks to ``model``, the model given to ``register``."""
    hooks = PinSettings(registration)
    model.register_forward_pre_hook(hooks.before)
    model.register_forward_hook(hooks.after, always_call=True)


def unpin(model: nn.Module) -> None:
    """Remove every :class:`PinSettings` hook from ``model``."""
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key in [k for k, hook in hooks.items() if isinstance(getattr(hook, "__self__", None), PinSettings)]:
            del hooks[key]
            model._forward_hooks_always_called.pop(key, None)


class ChipConstraint(nn.Module):
    r"""The chip constraint of one weight: :math:`w \mapsto w + h\,(\mathrm{chip}(w) - w)`.

    ``chip(w)`` is what :meth:`Registry.project_ <nwave_param.Registry.project_>` would write
    (:func:`nwave_param.functional.project`); the gradient passes straight through to :math:`w`.
    At hardness 0 the forward returns its input, the same tensor object: the model computes
    bit-identical outputs, in-place init reaches the weight and no memory is added.

    It holds what its forward needs (the layout and its :class:`Registration`) and the owning
    module's parameter order, so that removal restores the state_dict key order.  It adds no
    parameters or buffers; its extra state, saved in the state_dict, is its
    :mod:`~nwave_param.description` (layout, spec and hardness) as a small tensor.

    Register it with :func:`nwave_param.register`, which also gives the module a class of its
    own and the hooks that load checkpoints::

        >>> import nwave_param as nwp
        >>> fc = nn.Linear(2, 3, bias=False)
        >>> reg = nwp.register(fc)
        >>> fc.parametrizations.weight[0]
        ChipConstraint(ChipSpec(limit=0.9, group_size=5), Layout(gates=1, groups=1, transposed=False), hardness=0.0)
    """

    def __init__(self, layout: Layout, registration: Registration, parameter_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.layout = layout
        self.registration = registration
        self.parameter_order = parameter_order
        # Registry.on_chip: one chip instance, its mismatch sample (or None); plain attributes,
        # which torch.compile guards, and which a copy does not take (see __getstate__)
        self.on_chip = False
        self.chip_mismatch: Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(on_chip=False, chip_mismatch=None)  # a copy made inside on_chip is not on a chip
        return state

    @property
    def settings(self) -> Settings:
        return self.registration.settings

    def forward(self, weight: Tensor) -> Tensor:
        settings = settings_in_effect(self.registration)  # read once: a concurrent harden() swaps it whole
        spec, hardness = settings.spec, settings.hardness
        if self.on_chip and not getattr(_threads, "tracing", False):  # what one chip holds, whatever the hardness and mode
            return functional.harden(weight, self.layout, spec, 1.0, self.chip_mismatch)
        noise = None
        if spec.mismatch and hardness and self.training:  # a fresh mismatch sample per forward pass
            noise = torch.randn_like(weight).mul_(spec.mismatch)
        return functional.harden(weight, self.layout, spec, hardness, noise)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Identity, so assigning ``module.weight = value`` stores ``value`` as the latent weight."""
        return weight

    def get_extra_state(self) -> Tensor:
        """The description saved in the state_dict: the layout, the spec and the hardness."""
        settings = self.registration.settings
        return description.encode(self.layout, settings.spec, settings.hardness)

    def set_extra_state(self, state: object) -> None:
        """Check a checkpoint's description against this constraint (the model's load hook has
        already checked every one and restored the hardness, before any tensor was copied)."""
        saved = description.decode(state)
        if saved is None or not saved.fits(self.layout, self.settings.spec):
            raise ValueError(f"a checkpoint's description {saved or 'that cannot be read'} does not fit this constraint ({self.extra_repr()})")

    def extra_repr(self) -> str:
        return f"{self.settings.spec}, {self.layout}, hardness={self.settings.hardness}"


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
        self.shared = hardening.Shared()  # what the hardening leaves for the penalty of this pass
        self.slots: dict[object, object] = _threads.__dict__.setdefault("slots", {})
        _threads.__dict__.setdefault("passes", {})[registration] = self
        self.reset()

    def reset(self) -> None:
        """Compute every value again at the next read."""
        self.shared = hardening.Shared()
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
        _threads.passes.pop(self.registration, None)


class Pending:
    """In a slot: the pass has not computed this value yet."""

    __slots__ = ("current",)

    def __init__(self, current: Pass) -> None:
        self.current = current


def open_pass(registration: Registration) -> Pass | None:
    """This thread's open pass of ``registration``, if any."""
    passes = getattr(_threads, "passes", None)
    return passes.get(registration) if passes else None


def slot_key(module: nn.Module, tensor_name: str) -> object:
    """What a pass files ``module.<tensor_name>``'s value under: its property's own key."""
    return type(module).__dict__[tensor_name].fget.slot_key


def _original(module: nn.Module, tensor_name: str) -> Tensor:
    """``module.parametrizations[tensor_name].original``, read from the modules' dicts: once per
    weight per pass, where ``nn.Module.__getattr__`` would cost a microsecond each."""
    links = module._modules["parametrizations"]._modules[tensor_name]
    original = links._parameters.get("original")
    return original if original is not None else links.original


def _read_in_pass(cls: type, tensor_name: str) -> None:
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
            slots = getattr(_threads, "slots", None)
            if slots:
                value = slots.get(key)
                if value is not None:
                    return value.current.compute(key) if type(value) is Pending else value
        return getter(module)

    get.slot_key = key
    setattr(cls, tensor_name, property(get, original.fset))


# --- a class of its own for every module that carries a constraint ---------------------------


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
        _read_in_pass(module.__class__, tensor_name)


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
    _read_in_pass(module.__class__, tensor_name)


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


# --- the chain a constraint sits in ----------------------------------------------------------


def links_before(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> list[nn.Module]:
    """The parametrizations before ``constraint`` in the chain of ``module.<tensor_name>``."""
    chain = list(module.parametrizations[tensor_name])
    return chain[: next(i for i, link in enumerate(chain) if link is constraint)]


def originals(module: nn.Module, tensor_name: str) -> list[Tensor]:
    """The tensors the chain of ``module.<tensor_name>`` stores (``original``, or ``original0..k``)."""
    chain = module.parametrizations[tensor_name]
    return [chain.original] if chain.is_tensor else [getattr(chain, f"original{i}") for i in range(chain.ntensors)]


def latent(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> Tensor:
    """The latent weight: what the chain computes up to ``constraint`` (the stored Parameter
    itself when the constraint comes first)."""
    before = links_before(module, tensor_name, constraint)
    if not before:
        return module.parametrizations[tensor_name].original
    value = before[0](*originals(module, tensor_name))
    for link in before[1:]:
        value = link(value)
    return value


def write_through_chain(module: nn.Module, tensor_name: str, constraint: ChipConstraint, name: str, target: Tensor, spec: ChipSpec) -> None:
    """Write ``target`` as the latent value through the earlier parametrizations' right_inverse,
    read it back, and accept it only if it is finite and mappable.

    A chain's forward may round the value an ulp past the limit (weight_norm's ``g * v / |v|``):
    then the value is projected again a few ulps inside, up to 8 times, without ``spec.bits``
    (a grid value cannot move).
    """
    layout, limit = constraint.layout, spec.limit
    for attempt in range(8):
        setattr(module, tensor_name, target)  # nwave_param's right_inverse is the identity
        held = latent(module, tensor_name, constraint)
        if not bool(torch.isfinite(held).all()):
            raise ValueError(
                f"{name}: {_names(module, tensor_name, constraint)} turns the projected value into NaN or inf "
                "(weight_norm cannot hold an all-zero row); every weight was restored"
            )
        if build_report([name], [held], [layout], spec, 2).is_mappable:
            return
        if spec.bits is not None:
            raise ValueError(
                f"{name}: {_names(module, tensor_name, constraint)} moves the projected values off the {spec.bits}-bit grid "
                "(its forward rounds them); every weight was restored. Fold that parametrization into "
                "the weight first: torch.nn.utils.parametrize.remove_parametrizations(module, name, "
                "leave_parametrized=True) after reg.remove(), then register again"
            )
        limit -= torch.finfo(held.dtype).eps * spec.limit * 2**attempt
        target = functional.project(held, layout, dataclasses.replace(spec, limit=limit))
    raise ValueError(
        f"{name}: {_names(module, tensor_name, constraint)} cannot hold a mappable value here (orthogonal cannot hold a "
        "sign-aligned matrix); every weight was restored"
    )


def _names(module: nn.Module, tensor_name: str, constraint: ChipConstraint) -> str:
    return " -> ".join(type(link).__name__ for link in links_before(module, tensor_name, constraint))
