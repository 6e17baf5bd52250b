"""Which weights a state_dict holds, and their layouts: from the descriptions a registered model
saved, from names and shapes, or from the model itself.

Each way returns :class:`Weight` s, every value checked readable and every layout checked
against its shape before any computation; what it noticed goes into ``notes``.
:mod:`nwave_param.checkpoints.offline` chooses the way and the spec.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nwave_param import description
from nwave_param.checkpoints.files import Checkpoint
from nwave_param.core.discovery import constraints, excluded, is_weight_name, ruled, stated_for, unmatched
from nwave_param.core.registry import register, strip
from nwave_param.core.state import descriptions, original_key, parse_original_key, plain_state_dict
from nwave_param.errors import MESSAGE, CheckpointError, one_line
from nwave_param.layout import RNN_WEIGHT, Layout, rnn_gates
from nwave_param.sharing import memory_sharing, same_bits, view_of
from nwave_param.spec import ChipSpec

__all__ = ["Weight", "described_weights", "inferred_weights", "inner_state_dict", "model_weights", "redescribed"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what functional.project computes in
EMBEDDING = "*embed*"


@dataclass
class Weight:
    """A tracked weight: its name, the state_dict keys holding it, its value and layout.

    ``keys`` lists every key of a tied weight (the first one is read, all are written); it is
    empty for a weight stored through other parametrizations (readable only with a model).
    ``exact`` is False where the layout is guessed.
    """

    name: str
    keys: tuple[str, ...]
    value: Tensor
    layout: Layout
    exact: bool


# --- reading a weight --------------------------------------------------------------------------


def _check_readable(name: str, value: Tensor) -> None:
    """Refuse what functional.project cannot compute with, or not one value per element, naming the way out."""
    shown = one_line(name)
    if not isinstance(value, Tensor):
        raise CheckpointError(
            f"{shown} holds a {type(value).__name__}, not a tensor: a weight is a tensor; fix the state_dict, or exclude {shown}"
        )
    if value.layout != torch.strided:
        problem = f"is a sparse tensor ({value.layout}): nwave_param reads dense weights; save it dense (tensor.to_dense())"
    elif value.dtype not in DTYPES:
        problem = f"has dtype {value.dtype}: nwave_param checks float16, bfloat16, float32 and float64 weights; convert it"
    elif value.is_meta:
        problem = (
            "is a meta tensor, saved without its values (a model built on the meta device?): "
            "save the model once its weights are materialized"
        )
    else:
        sharing = memory_sharing(value)
        problem = sharing and f"{sharing}: the chip holds one value per element; save it with .contiguous()"
    if problem:
        raise CheckpointError(f"{shown} {problem}, or exclude {shown}")


def _check_layout(path: str, name: str, shape: torch.Size, layout: Layout) -> None:
    """Refuse, naming the weight, a layout that cannot read a tensor of ``shape``, before any computation."""
    try:
        layout.check(shape, one_line(name))
    except ValueError as error:
        raise CheckpointError(
            f"{one_line(path)}: {error}; pass the model (--model MODULE:FACTORY) for its own layouts, or exclude {one_line(name)}"
        ) from None


def _tracked(weights: dict, seen: dict, name: str, key: str, value: Tensor, layout: Layout, exact: bool) -> None:
    """Add a weight, or its key to the weight it is tied to (tracked once, by its first name, as
    register() lists it), refusing a tie read with two layouts."""
    first = seen.get(view_of(value))
    if first is None:
        seen[view_of(value)] = weights[name] = Weight(name, (key,), value, layout, exact)
    elif layout != first.layout:
        raise CheckpointError(
            f"{one_line(first.keys[0])} and {one_line(key)} hold one tensor but read it with different layouts "
            f"({first.layout} and {layout}): the chip holds a different value for each; untie them, or exclude one of them"
        )
    else:
        first.keys += (key,)


# --- which weights, and their layouts ----------------------------------------------------------


def described_weights(checkpoint: Checkpoint, described: Mapping, exclude: Sequence[str], notes: list[str]) -> list[Weight]:
    """The weights the file describes, with their exact layouts (the registration's choice of weights)."""
    state_dict = checkpoint.state_dict
    _note(notes, unmatched(exclude, list(described)))
    weights: dict[str, Weight] = {}
    chained, missing, seen = [], [], {}
    for name, (key, saved) in described.items():
        if excluded(name, exclude):
            continue
        value = state_dict.get(key) if key is not None else None
        if key is None:
            chained.append(name)
        elif not isinstance(value, Tensor):
            missing.append(name)
        else:
            _check_readable(name, value)
            _check_layout(checkpoint.path, name, value.shape, saved.layout)
            _tracked(weights, seen, name, key, value, saved.layout, True)
    if chained:
        notes.append(skipped_chained(chained))
    if missing:
        notes.append(f"described, but their tensors are missing from the file: {', '.join(missing)}")
    untracked = []
    for key, value in state_dict.items():  # weights, plain or registered, that no description names
        original = parse_original_key(key)
        if original is not None:
            name = original[0] + original[1] if original[2] == "original" else None
        else:
            name = key if is_weight_name(key.rpartition(".")[2]) else None
        if name is not None and name not in described and isinstance(value, Tensor) and value.dim() >= 2 and view_of(value) not in seen:
            untracked.append(name)
    if untracked:
        notes.append(f"not tracked by the registration the file was saved from (as in Python): {', '.join(untracked)}")
    return list(weights.values())


def inferred_weights(
    checkpoint: Checkpoint, exclude: Sequence[str], assume_plain: bool, notes: list[str], stated: Mapping[str, Layout] | None = None
) -> list[Weight]:
    """The tracked weights of a file that does not describe them, layouts from names and shapes.

    Certain: 2-D weights (a Linear's) and RNN-family weights (gates from the ``weight_hh``
    shapes); ``stated`` (``layouts=``) also names tensors of other names to read.  Guessed:
    convolution-shaped tensors (read as plain convolutions) and, only with ``assume_plain``, 2-D
    ``*embed*`` tensors (read as Linear weights; excluded otherwise).
    """
    state_dict = checkpoint.state_dict
    keys = weight_keys(state_dict, notes)
    values = {name: state_dict[key] for name, key in keys.items()}
    named = {n for n in values if any(fnmatch.fnmatchcase(n, pattern) for pattern in stated or ())}  # layouts= names them
    candidates = [n for n, v in values.items() if (is_weight_name(n.rpartition(".")[2]) or n in named) and v.dim() >= 2]
    _note(notes, unmatched(exclude, candidates))
    weights: dict[str, Weight] = {}
    embeddings, seen, left_out = [], {}, set()
    for name in candidates:
        value, view = values[name], view_of(values[name])
        embedding = value.dim() == 2 and fnmatch.fnmatchcase(name.lower(), EMBEDDING)
        if excluded(name, exclude):
            leave_out = True
        elif embedding and not assume_plain:
            embeddings.append(name)
            leave_out = True
        else:
            leave_out = view in left_out
        if leave_out:
            if view not in seen:  # a tie's first name decides: the others are left out with it
                left_out.add(view)
            continue
        _check_readable(name, value)
        layout = _rnn_layout(name, values) if RNN_WEIGHT.match(name.rpartition(".")[2]) else Layout()
        _check_layout(checkpoint.path, name, value.shape, layout)
        _tracked(weights, seen, name, keys[name], value, layout, value.dim() == 2 and not embedding)
    if embeddings:
        notes.append(
            f"excluded as embeddings (nwave_param never tracks nn.Embedding): {', '.join(embeddings)}; "
            "pass assume_plain (--assume-plain) to read them as Linear weights"
        )
    return list(weights.values())


def _rnn_layout(name: str, weights: Mapping[str, Tensor]) -> Layout:
    """The layout of an RNN-family ``weight_ih*``/``weight_hh*``, its gates told by the ``weight_hh`` (and ``weight_hr``) beside it."""
    path, _, local = name.rpartition(".")
    prefix = f"{path}." if path else ""
    suffix = RNN_WEIGHT.match(local).group("suffix") or ""
    hh, hr = weights.get(f"{prefix}weight_hh{suffix}"), weights.get(f"{prefix}weight_hr{suffix}")
    gates = rnn_gates(hh.shape if hh is not None else None, hr.shape if hr is not None else None)
    if gates is None:
        found = f"of shape {tuple(hh.shape)} fits no RNN, GRU or LSTM layout" if hh is not None else "is not beside it"
        raise CheckpointError(f"cannot tell the gates of {one_line(name)}: {one_line(prefix)}weight_hh{suffix} {found}")
    return Layout(gates=gates)


def model_weights(
    checkpoint: Checkpoint,
    model: nn.Module,
    spec: ChipSpec,
    described: Mapping,
    exclude: Sequence[str],
    notes: list[str],
    layouts: Mapping[str, Layout] | None = None,
) -> list[Weight]:
    """The tracked weights with the exact layouts of ``model`` (a copy of it, registered afresh
    with ``spec``, loads the checkpoint); the values stay the checkpoint's own, in its own dtype.

    The layouts are the model's registration's where it is registered (read from its forward or
    stated), else ``layouts``, else its module types' rules, else, for a Parameter of a module
    type without a rule, the checkpoint's description."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state_dict = checkpoint.state_dict
    try:
        model = copy.deepcopy(model)
    except Exception as error:  # whatever the model holds that cannot be copied
        raise CheckpointError(
            f"model: copy.deepcopy cannot copy it ({type(error).__name__}: {one_line(error)}); pass a freshly built model"
        ) from None
    registered = {entry.name: entry.constraint.layout for entry in constraints(model)}
    strip(model)
    layouts = dict(layouts or {})
    if registered:  # its registration read the forward (example=) or was told (layouts=): its layouts are the truth
        for name, layout in registered.items():
            by_hand = stated_for(name, layouts)
            if by_hand is not None and by_hand != layout:
                raise CheckpointError(
                    f"{one_line(name)}: layouts states {by_hand}, but the model's registration reads it with {layout}: "
                    "state what it computes"
                )
        stated = {**layouts, **registered}
    else:  # by module type; where a type has no rule, what the checkpoint's description says was read
        stated = {
            name: saved.layout for name, (_, saved) in described.items() if not ruled(model, name) and stated_for(name, layouts) is None
        }
        stated.update(layouts)
    expected = model.state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reg = register(model, spec, exclude=exclude, layouts=stated or None)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"model: {one_line(error, MESSAGE)}") from None
        keys = {name: _key_of(name, state_dict) for name in reg.names}
        for name, key in keys.items():  # before the file's values go anywhere, or plain_state_dict computes on them
            if key is not None:
                _check_readable(name, state_dict[key])
        layouts = dict(zip(reg.names, reg.layouts))
        for name, (key, saved) in described.items():  # plain_state_dict computes with the file's layouts
            if name in layouts and saved.layout != layouts[name]:
                raise CheckpointError(
                    f"{one_line(name)}: the model reads it with {layouts[name]}, but {one_line(checkpoint.path)} describes "
                    f"{saved.layout}: is it the model the checkpoint was saved from?"
                )
            value = state_dict.get(key) if key is not None else None
            if isinstance(value, Tensor):
                if name not in keys:  # described, not tracked by this model
                    _check_readable(name, value)
                _check_layout(checkpoint.path, name, value.shape, saved.layout)
        try:  # plain keys: the file's own spec may differ from the one asked for
            loadable = plain_state_dict(state_dict)
        except ValueError:
            loadable = state_dict
        else:
            _check_fits(checkpoint.path, expected, loadable)
        try:
            model.load_state_dict(loadable)
        except RuntimeError as error:  # torch's message spans lines: its words, on one
            raise CheckpointError(
                f"{one_line(checkpoint.path)} does not load into the model: {one_line(' '.join(str(error).split()), MESSAGE)}"
            ) from None
    notes.extend(str(warning.message) for warning in caught)
    held = model.state_dict(keep_vars=True)
    with contextlib.suppress(ValueError):  # the file may hold the plain keys of a tied weight
        held = {**held, **plain_state_dict(held)}
    weights = []
    for name, value, layout in zip(reg.names, reg.latent_weights(), reg.layouts):
        key = keys[name]
        aliases = tuple(k for k, t in held.items() if t is value and k != key and k in state_dict)  # tied keys
        stored = state_dict[key] if key is not None else value.detach()
        differing = [alias for alias in aliases if not (isinstance(state_dict[alias], Tensor) and same_bits(state_dict[alias], stored))]
        if differing:
            raise CheckpointError(
                f"{one_line(key)} and {one_line(differing[0])} are one parameter of the model, but the checkpoint holds "
                f"different values under them: pass the model the checkpoint was saved from, or exclude {one_line(name)}"
            )
        _check_readable(name, stored)
        _check_layout(checkpoint.path, name, stored.shape, layout)
        weights.append(Weight(name, (key, *aliases) if key is not None else (), stored, layout, True))
    return weights


def _check_fits(path: str, expected: Mapping[str, object], loadable: Mapping[str, object]) -> None:
    """Refuse, on one line, a state_dict the model would not load with ``strict=True``: keys
    missing or unexpected, tensors of other shapes."""
    listed = lambda keys: ", ".join(map(one_line, keys[:5])) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")  # noqa: E731
    missing = [key for key in expected if key not in loadable]
    unexpected = [key for key in loadable if key not in expected]
    reshaped = [
        f"{key} {tuple(value.shape)} in the file, {tuple(expected[key].shape)} in the model"
        for key, value in loadable.items()
        if key in expected and isinstance(value, Tensor) and isinstance(expected[key], Tensor) and value.shape != expected[key].shape
    ]
    problems = [f"missing {listed(missing)}"] * bool(missing) + [f"unexpected {listed(unexpected)}"] * bool(unexpected)
    problems += [f"shape of {listed(reshaped)}"] * bool(reshaped)
    if problems:
        raise CheckpointError(
            f"{one_line(path)} does not fit the model: {'; '.join(problems)}: pass the model it was saved from "
            "(of a wrapped model, such as a Lightning module's net, the inner model and its own keys)"
        )


def _key_of(name: str, state_dict: Mapping[str, object]) -> str | None:
    """The key holding weight ``name`` in ``state_dict``: its plain or its registered key."""
    path, _, local = name.rpartition(".")
    registered = original_key(f"{path}." if path else "", local)
    return next((k for k in (name, registered) if k in state_dict), None)


def _note(notes: list[str], note: str | None) -> None:
    if note:
        notes.append(note)


# --- the state_dict's own keys, read without a model ----------------------------------------------


def skipped_chained(names: Iterable[str]) -> str:
    """The note on weights a state_dict holds only through other parametrizations' tensors."""
    return f"skipped {', '.join(names)}: stored through other parametrizations; pass the model to read them"


def weight_keys(state_dict: Mapping[str, object], notes: list[str]) -> dict[str, str]:
    """Weight name -> key of its tensor; registered keys (``*.parametrizations.*.original``) by their weight's name."""
    found: dict[str, str] = {}
    chained = set()
    for key, value in state_dict.items():
        original = parse_original_key(key) if isinstance(value, Tensor) else None
        if original is None:
            if isinstance(value, Tensor):
                found.setdefault(key, key)
        elif original[2] == "original":
            found[original[0] + original[1]] = key
        else:
            chained.add(original[0] + original[1])
    if chained:
        notes.append(skipped_chained(sorted(chained)))
    return found


def redescribed(state_dict: Mapping[str, object], spec: ChipSpec) -> dict[str, Tensor]:
    """Each description in ``state_dict``, by key, rewritten to say ``spec`` (for values projected
    onto it), keeping its layout and hardness (0 for a version 0.2 description, which has none)."""
    return {key: description.encode(saved.layout, spec, saved.hardness or 0.0) for key, _, saved in descriptions(state_dict)}


AVERAGED = "n_averaged"  # the buffer torch.optim.swa_utils.AveragedModel keeps beside its module.*


def inner_state_dict(
    state_dict: Mapping[str, Tensor], prefix: str | None, names: Sequence[str], wrapped: bool, notes: list[str]
) -> OrderedDict[str, Tensor]:
    """The keys of ``state_dict`` under ``prefix``, without it, as the inner model loads them
    (the module versions of ``_metadata`` included).  ``prefix=None`` finds it: in a ``wrapped``
    state_dict (a Lightning checkpoint's) or an AveragedModel's, the first component common to
    the tracked weights' ``names`` (``net.``, ``module.``); none in a bare one, its model's own.
    What is left out is said in ``notes``.

    Raises:
        ValueError: no key under ``prefix``, or a found prefix leaves out more than AveragedModel's counter.
    """
    if prefix is None:
        prefix = _inner_prefix(state_dict, names, wrapped or AVERAGED in state_dict, notes)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    inner = OrderedDict((key[len(prefix):], value) for key, value in state_dict.items() if key.startswith(prefix))
    if not inner:
        raise ValueError(f"no key starts with the prefix {prefix!r}")
    dropped = [key for key in state_dict if not key.startswith(prefix)]
    if dropped:
        notes.append(f"not part of the inner model, left out: {', '.join(dropped)}")
    versions = getattr(state_dict, "_metadata", None)
    if versions is not None:
        module = prefix.removesuffix(".")  # the inner model itself: "" under its own name
        inner._metadata = OrderedDict(
            (name[len(prefix):], value) for name, value in versions.items() if name == module or name.startswith(prefix)
        )
    return inner


def _inner_prefix(state_dict: Mapping[str, Tensor], names: Sequence[str], wrapped: bool, notes: list[str]) -> str:
    firsts = {name.partition(".")[0] if "." in name else None for name in names}
    if not wrapped or len(firsts) != 1 or None in firsts:
        return ""
    prefix = f"{firsts.pop()}."
    outside = [key for key in state_dict if not key.startswith(prefix) and key != AVERAGED]
    if outside:
        raise ValueError(
            f"the tracked weights are all under {prefix}, but {', '.join(outside)} are not: choose the prefix "
            f"{prefix} for the inner model's keys only, or '' to keep every key"
        )
    notes.append(f"the keys under {prefix} without it, the inner model's (the prefix '' keeps every key)")
    return prefix
