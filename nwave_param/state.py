"""State-dict plumbing: the keys a registration adds, loading plain checkpoints, and the way back.

A registered weight ``fc.weight`` is saved as PyTorch's parametrize saves it,
``fc.parametrizations.weight.original``, and its :class:`ChipConstraint` (at position ``i`` of
the chain) adds ``fc.parametrizations.weight.<i>._extra_state``: the layout and the spec, so
that a checkpoint describes itself (the command line reads them).  The hardness is not saved.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.utils import parametrize

from .parametrization import ChipConstraint, describe, read_description, same_description

__all__ = ["plain_state_dict"]


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


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Fill in what a plain checkpoint lacks; refuse a description that contradicts the model.

    * ``fc.weight`` goes to ``fc.parametrizations.weight.original`` where the constraint is the
      weight's only parametrization;
    * a missing extra state is this constraint's own (a plain checkpoint, or one saved before
      checkpoints described themselves);
    * a saved layout or spec that differs from the constraint's raises ValueError naming the weight.
    """
    for tensor_name, position, constraint in chip_links(module):
        plain, original = prefix + tensor_name, original_key(prefix, tensor_name)
        if len(module.parametrizations[tensor_name]) == 1 and plain in state_dict and original not in state_dict:
            state_dict[original] = state_dict.pop(plain)
        key = extra_state_key(prefix, tensor_name, position)
        mine = (constraint.layout, constraint.settings.spec)
        if key not in state_dict:
            state_dict[key] = describe(*mine)
        elif not same_description(read_description(state_dict[key]), *mine):
            saved = read_description(state_dict[key])
            what = f"layout {saved[0]} and {saved[1]}" if saved else f"an unreadable description {state_dict[key]!r}"
            raise ValueError(
                f"{prefix}{tensor_name}: the checkpoint was saved with {what}, but this model is registered "
                f"with layout {mine[0]} and {mine[1]}: register it with the checkpoint's spec, or load "
                "nwp.plain_state_dict(checkpoint) into the plain model"
            )


def add_load_hook(module: nn.Module) -> None:
    if not any(getattr(h, "hook", None) is _load_pre_hook for h in module._load_state_dict_pre_hooks.values()):
        module.register_load_state_dict_pre_hook(_load_pre_hook)


def remove_load_hook(module: nn.Module) -> None:
    hooks = module._load_state_dict_pre_hooks
    for key in [k for k, h in hooks.items() if getattr(h, "hook", None) is _load_pre_hook]:
        del hooks[key]


def restore_order(module: nn.Module, order: tuple[str, ...]) -> None:
    """Re-insert ``module._parameters`` in its pre-registration order (parametrize appends)."""
    params = module._parameters
    for key in [k for k in order if k in params] + [k for k in params if k not in order]:
        params[key] = params.pop(key)


def plain_state_dict(source: nn.Module | Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    """The keys a plain model (without nwave_param) loads with ``strict=True``.

    ``source`` is a registered model or a state_dict saved from one.  Where nwave_param's
    constraint is a weight's only parametrization, ``fc.parametrizations.weight.original``
    becomes ``fc.weight``; every nwave_param description (``..._extra_state``) is dropped; all
    other entries are kept as they are, in order, the same tensors.

    Example::

        >>> import nwave_param as nwp
        >>> model = nn.Linear(2, 3)
        >>> reg = nwp.register(model)
        >>> list(nwp.plain_state_dict(model))
        ['bias', 'weight']

    Raises:
        ValueError: a weight whose chain holds a parametrization registered after nwave_param's
            (its keys in the plain model would differ), named.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else source
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a registered model or a state_dict, got {type(source).__name__}")
    ours: dict[tuple[str, str], int] = {}  # (path, tensor) -> position of nwave_param's constraint
    others: dict[tuple[str, str], set[int]] = {}  # positions holding other state
    for key, value in state.items():
        link = parse_link_key(key)
        if link is None:
            continue
        path, tensor_name, position, leaf = link
        if leaf == "_extra_state" and read_description(value) is not None:
            ours[path, tensor_name] = position
        else:
            others.setdefault((path, tensor_name), set()).add(position)
    late = sorted(f"{p}{t}" for (p, t), i in ours.items() if any(j > i for j in others.get((p, t), ())))
    if isinstance(source, nn.Module):  # the chains themselves: exact, stateless links included
        late = [
            f"{path}.{tensor_name}" if path else tensor_name
            for path, module in source.named_modules()
            for tensor_name, _, constraint in chip_links(module)
            if module.parametrizations[tensor_name][-1] is not constraint
        ]
    if late:
        raise ValueError(
            f"{', '.join(late)}: a parametrization registered after nwave_param's sits in the chain; its keys "
            "in a plain model are not known: remove it in Python first"
        )
    plain: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        match = KEY_PATTERN.match(key)
        where = (match["path"], match["tensor"]) if match else None
        if where in ours:
            position = ours[where]
            if match["rest"] == f"{position}._extra_state":
                continue
            if position == 0 and match["rest"] == "original" and where not in others:
                key = match["path"] + match["tensor"]
        plain[key] = value
    return plain
