"""State-dict plumbing: the keys a registration adds, loading checkpoints, and the way back.

A registered weight ``fc.weight`` is saved as PyTorch's parametrize saves it,
``fc.parametrizations.weight.original``, and its :class:`ChipConstraint` (at position ``i`` of
the chain) adds ``fc.parametrizations.weight.<i>._extra_state``: its
:mod:`~nwave_param.description` (layout, spec and hardness, a small tensor), so that a
checkpoint describes itself.  Loading one checks every description before any tensor is copied,
and restores the hardness; a plain checkpoint (``fc.weight``) loads too.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param import description, functional
from nwave_param.core.chains import latent
from nwave_param.core.parametrization import ChipConstraint
from nwave_param.sharing import view_of

__all__ = ["plain_state_dict", "restore", "snapshot"]


def original_key(prefix: str, tensor_name: str) -> str:
    return f"{prefix}parametrizations.{tensor_name}.original"


def extra_state_key(prefix: str, tensor_name: str, position: int) -> str:
    return f"{prefix}parametrizations.{tensor_name}.{position}._extra_state"


# <path>.parametrizations.<tensor>.<rest>: rest is original, original<k>, or <position>.<state>
KEY_PATTERN = re.compile(r"^(?P<path>(?:.*\.)?)parametrizations\.(?P<tensor>[^.]+)\.(?P<rest>.+)$")


def parse_original_key(key: str) -> tuple[str, str, str] | None:
    """``(path, tensor_name, original)`` for the key of a chain's stored tensor (``original``, or
    ``original<k>`` when its first link takes several), None for any other key."""
    match = KEY_PATTERN.match(key)
    if match is None or not re.fullmatch(r"original\d*", match["rest"]):
        return None
    return match["path"], match["tensor"], match["rest"]


def parse_link_key(key: str) -> tuple[str, str, int, str] | None:
    """``(path, tensor_name, position, leaf)`` for a key of the link at ``position`` in a chain
    (``<path>parametrizations.<tensor>.<position>.<leaf>``), None for any other key.  A constraint
    saves its description under the leaf ``_extra_state``."""
    match = KEY_PATTERN.match(key)
    if match is None:
        return None
    position, _, leaf = match["rest"].partition(".")
    return (match["path"], match["tensor"], int(position), leaf) if position.isdecimal() else None


def chip_links(module: nn.Module):
    """``(tensor_name, position, constraint)`` of the chains of ``module`` holding a ChipConstraint."""
    if not parametrize.is_parametrized(module):  # every parametrization removed by hand
        return
    for tensor_name, chain in module.parametrizations.items():
        for position, link in enumerate(chain):
            if isinstance(link, ChipConstraint):
                yield tensor_name, position, link


def _links_under(module: nn.Module, prefix: str) -> Iterator[tuple[str, str, int, ChipConstraint]]:
    """``(key prefix, module, tensor_name, position, constraint)`` of every ChipConstraint in ``module``'s
    tree, as its state_dict keys (under ``prefix``) name them."""
    for path, sub in module.named_modules(prefix=prefix.removesuffix("."), remove_duplicate=False):
        for tensor_name, position, constraint in chip_links(sub):
            yield f"{path}." if path else "", sub, tensor_name, position, constraint


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, metadata, strict, missing, unexpected, errors: list) -> None:
    """Check every description under ``module`` before any of its tensors is copied, then fill in
    what a plain checkpoint lacks and restore the checkpoint's hardness.

    * a saved layout or spec that does not fit its constraint raises ValueError naming the weight,
      and nothing changes;
    * ``fc.weight`` goes to ``fc.parametrizations.weight.original`` where the constraint is the
      weight's only parametrization;
    * a missing description is the constraint's own (a plain checkpoint);
    * a registration whose hardness differs from the checkpoint's takes the checkpoint's, with a
      warning naming both: the model then computes what the saved model computed.

    Registered on the model given to :func:`~nwave_param.register` and on every module carrying a
    constraint, so that it runs before the first tracked tensor is copied, wherever loading starts.
    When loading started at a parent (part of a model registered), the whole load is checked at
    the first of these hooks (:func:`_check_whole_load`).
    """
    if prefix:
        _check_whole_load(prefix, errors)
    links = list(_links_under(module, prefix))
    problems, hardness = _description_problems(links, state_dict)
    if problems:
        raise ValueError(f"{'; '.join(problems)}: {_REFUSED}; nothing was loaded")
    for registration, saved, name in hardness.values():
        if registration.settings.hardness != saved:
            warnings.warn(
                f"{name}: the checkpoint was saved at hardness {saved}, and the model was registered at "
                f"{registration.settings.hardness}; loading sets {saved}, so the model computes as the saved one did",
                UserWarning,
                stacklevel=4,
            )
            registration.replace_settings(dataclasses.replace(registration.settings, hardness=saved))
    for path, holder, tensor_name, position, constraint in links:
        plain, original = path + tensor_name, original_key(path, tensor_name)
        if len(holder.parametrizations[tensor_name]) == 1 and plain in state_dict and original not in state_dict:
            state_dict[original] = state_dict.pop(plain)
        key = extra_state_key(path, tensor_name, position)
        if key not in state_dict:
            state_dict[key] = constraint.get_extra_state()


_REFUSED = "register the model as the checkpoint was, or load nwp.plain_state_dict(checkpoint) into the plain model"


def _description_problems(links: list, state_dict: Mapping[str, object]) -> tuple[list[str], dict]:
    """What in ``state_dict`` does not fit the constraints of ``links``, one line each, and the
    hardness each registration is saved at (by registration)."""
    problems, hardness = [], {}
    for path, _, tensor_name, position, constraint in links:
        key = extra_state_key(path, tensor_name, position)
        if key not in state_dict:
            continue
        try:
            saved = description.decode(state_dict[key])
        except description.NewerDescriptionError as error:
            problems.append(f"{path}{tensor_name}: {error}")
            continue
        mine = (constraint.layout, constraint.settings.spec)
        if saved is None or not saved.fits(*mine):
            what = f"layout {saved.layout} and {saved.spec}" if saved else "a description that cannot be read"
            problems.append(
                f"{path}{tensor_name}: the checkpoint was saved with {what}, "
                f"but this model is registered with layout {mine[0]} and {mine[1]}"
            )
        elif saved.hardness is not None:
            named = hardness.setdefault(id(constraint.registration), (constraint.registration, saved.hardness, f"{path}{tensor_name}"))
            if named[1] != saved.hardness:
                problems.append(
                    f"{named[2]} and {path}{tensor_name} were saved at hardness {named[1]} and {saved.hardness}, "
                    "but this model registered them together"
                )
    return problems, hardness


_whole_load = threading.local()  # the load (its list of error messages) already checked whole, in this thread


def _check_whole_load(prefix: str, errors: list) -> None:
    """At the first of nwave_param's hooks in a load that started at a parent module: check every
    description under the module being loaded, so that no registered part loads before another
    part's checkpoint is refused, and name the keys torch already copied into the modules it
    loaded first, which carry no hook of nwave_param (torch has none that runs before them).

    The load is ``Module.load_state_dict``'s, read from the calling frames (``errors`` is its own
    list, one per load).  Where no such frame is found (a hand-made loader), each registered part
    checks its own keys, as the hook does anyway."""
    if getattr(_whole_load, "errors", None) is errors:
        return
    _whole_load.errors = errors
    found = _load_in_progress()
    if found is None:
        return
    root, full = found
    problems, _ = _description_problems(list(_links_under(root, "")), full)
    if not problems:
        return
    loaded = _keys_loaded_before(root, full, prefix)
    already = (
        f"; torch has already copied {_listed(loaded)}, which {type(root).__name__}.load_state_dict loads before "
        f"{prefix.removesuffix('.')}: register the whole model (nwp.register(model, exclude=...)) to have every key checked first"
        if loaded else ""
    )
    raise ValueError(f"{'; '.join(problems)}: {_REFUSED}; nothing registered was loaded{already}")


def _load_in_progress() -> tuple[nn.Module, Mapping[str, object]] | None:
    """The module whose ``load_state_dict`` runs in this thread (the innermost call), and the
    state_dict it loads."""
    code = nn.Module.load_state_dict.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            root, full = frame.f_locals.get("self"), frame.f_locals.get("state_dict")
            return (root, full) if isinstance(root, nn.Module) and isinstance(full, Mapping) else None
        frame = frame.f_back
    return None


def _keys_loaded_before(root: nn.Module, state_dict: Mapping[str, object], prefix: str) -> list[str]:
    """The keys of ``state_dict`` that ``root.load_state_dict`` copies before it reaches the module
    at ``prefix``: modules load in ``named_modules`` order, each its own tensors before its children."""
    here = prefix.removesuffix(".")
    loaded = []
    for path, module in root.named_modules(remove_duplicate=False):
        if path == here:
            break
        at = f"{path}." if path else ""
        own = [*(n for n, p in module._parameters.items() if p is not None), *module._buffers, "_extra_state"]
        loaded += [at + name for name in own if at + name in state_dict]
    return loaded


def _listed(keys: Sequence[str], shown: int = 8) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def add_load_hook(module: nn.Module) -> None:
    if not any(getattr(h, "hook", None) is _load_pre_hook for h in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(_load_pre_hook)


def remove_load_hook(module: nn.Module) -> None:
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", None) is _load_pre_hook]:
        del hooks[key]


Snapshot = list[tuple[dict, dict, dict]]


def _version(tensor: Tensor) -> int | None:
    """The tensor's in-place write counter; None for an inference tensor, which keeps none."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def snapshot(modules: Iterable[nn.Module], attributes: bool = False) -> Snapshot:
    """Every parameter and buffer slot of ``modules`` and their submodules, and a copy of each
    tensor, for :func:`restore`; with ``attributes``, the modules' plain attributes too (each
    module's ``__dict__``: its training flag, and tensors a forward stored there).

    Code that runs may write a tensor in place or replace it (orthogonal's ``right_inverse``
    replaces its ``base``; snnTorch's neurons keep their last state in buffers)."""
    slots = [
        slot
        for module in modules
        for owner in module.modules()
        for slot in ((owner._parameters, owner._buffers, vars(owner)) if attributes else (owner._parameters, owner._buffers))
    ]
    return [
        (slot, dict(slot), {name: (value.detach().clone(), _version(value)) for name, value in slot.items() if isinstance(value, Tensor)})
        for slot in slots
    ]


@torch.no_grad()
def restore(saved: Snapshot) -> None:
    """Put back what :func:`snapshot` saw: the same objects in the same slots, holding the same values.

    Only a tensor written since is written back: a write bumps its version counter, and so
    would a needless copy, failing the backward of a graph built before the snapshot."""
    for slot, held, values in saved:
        slot.clear()
        slot.update(held)
        for name, (value, version) in values.items():
            if version is None or _version(held[name]) != version:
                held[name].copy_(value)


def restore_order(module: nn.Module, order: tuple[str, ...]) -> None:
    """Re-insert ``module._parameters`` in its pre-registration order (parametrize appends)."""
    params = module._parameters
    for key in [k for k in order if k in params] + [k for k in params if k not in order]:
        params[key] = params.pop(key)


def is_description_key(key: str) -> bool:
    """Whether ``key`` is where a :class:`ChipConstraint` saves its description (``..._extra_state``)."""
    link = parse_link_key(key)
    return link is not None and link[3] == "_extra_state"


def descriptions(state_dict: Mapping[str, object]) -> Iterator[tuple[str, tuple[str, str, int, str], description.Description]]:
    """``(key, link, description)`` for each of nwave_param's descriptions in ``state_dict``,
    ``link`` as :func:`parse_link_key` reads the key."""
    for key, value in state_dict.items():
        saved = description.decode(value) if is_description_key(key) else None
        if saved is not None:
            yield key, parse_link_key(key), saved


def plain_state_dict(source: nn.Module | Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The state_dict a plain model (without nwave_param) loads with ``strict=True``, holding what
    the registered model computes with.

    ``source`` is a registered model or a state_dict saved from one.  Each tracked weight holds
    its effective value in eval mode, as its description's hardness makes it: the latent weight
    at hardness 0, exactly what the chip holds at hardness 1 (``functional.harden``, with no
    mismatch noise), so a plain model loading it computes what the registered one computes, bit
    for bit.  Where nwave_param's constraint is a weight's only parametrization,
    ``fc.parametrizations.weight.original`` becomes ``fc.weight``; every nwave_param description
    (``..._extra_state``) is dropped; all other entries are kept as they are, in order, the same
    tensors.  A weight tied between several keys stays one tensor.

    Args:
        source: a registered model, or a state_dict saved from one.

    Returns:
        The plain model's state_dict, its entries in ``source``'s order.

    Raises:
        TypeError: ``source`` is neither an nn.Module nor a mapping.
        ValueError: a weight whose chain holds a parametrization registered after nwave_param's
            (its keys in the plain model would differ), or whose chain's own keys cannot hold its
            effective value (a hardened weight behind weight_norm: ``reg.project_()`` first), named;
            a description written by a newer nwave_param
            (:class:`~nwave_param.description.NewerDescriptionError`).

    Example::

        >>> import nwave_param as nwp
        >>> model = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = model.weight.mul_(10)
        >>> reg = nwp.register(model).harden(1.0)
        >>> plain = nwp.plain_state_dict(model)
        >>> list(plain), torch.equal(plain["weight"], model.weight)
        (['bias', 'weight'], True)
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a registered model or a state_dict, got {type(source).__name__}")
    # (path, tensor) -> nwave_param's link, and the positions of the other links holding state
    ours = {(path, tensor_name): (position, saved) for _, (path, tensor_name, position, _), saved in descriptions(state)}
    others: dict[tuple[str, str], set[int]] = {}
    for key in state:
        link = parse_link_key(key)
        if link is not None and ours.get(link[:2], (None,))[0] != link[2]:
            others.setdefault(link[:2], set()).add(link[2])
    if isinstance(source, nn.Module):  # the chains themselves: exact, stateless links included
        late = [
            _dotted(path, name)
            for path, holder, name, constraint in _module_links(source)
            if holder.parametrizations[name][-1] is not constraint
        ]
        chained = [
            _dotted(path, name)
            for path, holder, name, constraint in _module_links(source)
            if not _holds_effective(holder, name, constraint)
        ]
    else:
        late = sorted(f"{p}{t}" for (p, t), (i, _) in ours.items() if any(j > i for j in others.get((p, t), ())))
        chained = sorted(f"{p}{t}" for (p, t), (i, saved) in ours.items() if saved.hardness and (i or (p, t) in others))
    if late:
        raise ValueError(
            f"{', '.join(late)}: a parametrization registered after nwave_param's sits in the chain; its keys "
            "in a plain model are not known: remove it in Python first"
        )
    if chained:
        raise ValueError(
            f"{', '.join(chained)}: the model computes with the hardened value, which the keys of its other "
            "parametrizations cannot hold; call reg.project_() first (then they hold it), and pass the model itself"
        )
    plain: OrderedDict[str, Tensor] = OrderedDict()
    effective: dict[tuple, Tensor] = {}  # one value per tied tensor
    for key, value in state.items():
        match = KEY_PATTERN.match(key)
        where = (match["path"], match["tensor"]) if match else None
        if where in ours:
            position, saved = ours[where]
            if match["rest"] == f"{position}._extra_state":
                continue
            if position == 0 and match["rest"] == "original" and where not in others:
                key = match["path"] + match["tensor"]
                if saved.hardness:
                    identity = (view_of(value), saved.layout, saved.spec.essentials, saved.hardness)
                    if identity not in effective:
                        with torch.no_grad():
                            effective[identity] = functional.harden(value, saved.layout, saved.spec, saved.hardness).detach()
                    value = effective[identity]
        plain[key] = value
    return plain


def _dotted(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _module_links(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, ChipConstraint]]:
    for path, holder in model.named_modules():
        for tensor_name, _, constraint in chip_links(holder):
            yield path, holder, tensor_name, constraint


def _holds_effective(holder: nn.Module, tensor_name: str, constraint: ChipConstraint) -> bool:
    """Whether the chain's stored tensors hold what the weight computes with: always where the
    constraint is the only link (its key is rewritten), else when hardening changes nothing."""
    if holder.parametrizations[tensor_name][0] is constraint or not constraint.settings.hardness:
        return True
    settings = constraint.settings
    with torch.no_grad():
        value = latent(holder, tensor_name, constraint)
        return torch.equal(functional.harden(value, constraint.layout, settings.spec, settings.hardness), value)


