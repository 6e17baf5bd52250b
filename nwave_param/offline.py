"""A state_dict without its model: which weights it holds, their layouts, checked and projected.

::

    report = nwp.check_state_dict(torch.load("model.pt", weights_only=True))
    new_state_dict, changes = nwp.project_state_dict(state_dict, nwp.H1V2)

Where a weight's layout comes from, most trusted first: ``model`` (the model's own, by
registering a copy of it); the description a registered model saves beside each weight; the
names and shapes of 2-D and RNN-family weights.  Anything else is guessed ("assumed"): a
convolution-shaped tensor may be grouped or transposed, a 2-D ``*embed*`` tensor may be an
embedding.  Projection never changes a guessed weight unless ``assume_plain`` says so.  Every
layout is checked against its tensor's shape before any computation, and a weight whose elements
share memory is refused by name.  The command line (:mod:`nwave_param.cli`) is a shell over this.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import functional
from .description import damaged
from .discovery import excluded, is_weight_name, patterns, unmatched
from .errors import CheckpointError, one_line
from .files import Checkpoint
from .layout import RNN_WEIGHT, Layout, rnn_gates
from .registry import register, strip
from .report import Report, build_report
from .sharing import memory_sharing, same_bits, storage_of, view_of, with_values
from .spec import ChipSpec
from .state import (
    descriptions,
    is_description_key,
    original_key,
    parse_link_key,
    parse_original_key,
    plain_state_dict,
    redescribed,
    weight_keys,
)

__all__ = ["check_state_dict", "project_state_dict"]

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what functional.project computes in
EMBEDDING = "*embed*"
MESSAGE = 2000  # characters of a whole message, its pieces from outside cut already


def check_state_dict(
    state_dict: Mapping[str, object],
    spec: ChipSpec | None = None,
    *,
    model: nn.Module | None = None,
    exclude: str | Sequence[str] = (),
    assume_plain: bool = False,
) -> Report:
    """The :class:`~nwave_param.Report` of the weights in ``state_dict``, as the chip ``spec`` holds them.

    ``spec=None`` takes the spec the checkpoint was saved with (one registration's), else
    ``ChipSpec()``.  ``model`` (not registered, or registered: a copy is read, the model is left
    as it is) gives the exact layouts; ``exclude`` leaves out weights by glob.  What the reading
    noticed (guessed layouts, skipped keys) is issued as ``UserWarning``.

    Example::

        >>> import nwave_param as nwp
        >>> state = {"fc.weight": torch.full((10, 8), 0.5)}
        >>> nwp.check_state_dict(state, nwp.H1V2).is_mappable
        True
        >>> state["fc.weight"][0, 0] = 2.0  # beyond H1v2's limit, 1.66
        >>> nwp.check_state_dict(state, nwp.H1V2).is_mappable
        False

    Raises:
        CheckpointError: no trackable weight, a weight that cannot be read (sparse, integer,
            meta, expanded) or whose layout does not fit its shape, or specs that disagree.
    """
    reading = read(_bare(state_dict), spec, model=model, exclude=exclude, assume_plain=assume_plain)
    _warn(reading.notes)
    return reading.report()


def project_state_dict(
    state_dict: Mapping[str, object],
    spec: ChipSpec | None = None,
    *,
    model: nn.Module | None = None,
    exclude: str | Sequence[str] = (),
    assume_plain: bool = False,
) -> tuple[Mapping[str, object], list[dict]]:
    """A new state_dict whose weights are what the chip holds (:func:`nwave_param.functional.project`
    of each: the L1-nearest mappable values), and what changed, one dict a weight (``name``,
    ``layout``, ``shape``, ``numel``, ``changed``, ``l1_change``, ``max_change``).

    ``state_dict`` is left as it is; the new one keeps its keys, order, ties and views, and its
    descriptions now say ``spec``.  Arguments as :func:`check_state_dict`.

    Example::

        >>> import nwave_param as nwp
        >>> state = {"fc.weight": torch.full((5, 2), 3.0)}
        >>> new, changes = nwp.project_state_dict(state)  # onto H1v1: |w| <= 0.9
        >>> torch.equal(new["fc.weight"], torch.full((5, 2), 0.9)), changes[0]["changed"]
        (True, 10)

    Raises:
        CheckpointError: as :func:`check_state_dict`; also a weight holding NaN or infinite
            values, one whose layout is guessed (without ``assume_plain``), and tied weights whose
            projections disagree.  Nothing is changed.
    """
    reading = read(_bare(state_dict), spec, model=model, exclude=exclude, assume_plain=assume_plain)
    projected, _, changes = project(reading)
    _warn(reading.notes)
    return projected.state_dict, changes


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

    def to_dict(self) -> dict:
        return {"layout": "exact" if self.exact else "assumed", **self.layout.to_dict()}


@dataclass
class Reading:
    """What a checkpoint holds for the chip: the spec to hold it with, its weights, and notes."""

    checkpoint: Checkpoint
    spec: ChipSpec
    weights: list[Weight]
    notes: list[str]
    assume_plain: bool = False

    def report(self, values: Sequence[Tensor] | None = None) -> Report:
        """The report of the weights, or of ``values`` in their place."""
        values = [w.value for w in self.weights] if values is None else list(values)
        return build_report([w.name for w in self.weights], values, [w.layout for w in self.weights], self.spec, 2)


def read(
    checkpoint: Checkpoint,
    spec: ChipSpec | None = None,
    *,
    overrides: Mapping[str, object] | None = None,
    model: nn.Module | None = None,
    exclude: str | Sequence[str] = (),
    assume_plain: bool = False,
) -> Reading:
    """Choose the spec (``spec``, else the checkpoint's own, with ``overrides`` on top), the weights and their layouts."""
    if spec is not None and not isinstance(spec, ChipSpec):
        raise TypeError(f"spec must be a ChipSpec, got {type(spec).__name__}")
    if not isinstance(assume_plain, bool):
        raise TypeError(f"assume_plain must be True or False, got {assume_plain!r}")
    exclude = patterns(exclude)
    notes: list[str] = []
    _refuse_ambiguous(checkpoint)
    described = {
        path + tensor_name: (original_key(path, tensor_name) if position == 0 else None, saved)
        for _, (path, tensor_name, position, _), saved in descriptions(checkpoint.state_dict)
    }
    spec = _choose_spec(checkpoint.path, [saved.spec for _, saved in described.values()], spec, overrides or {}, notes)
    if model is not None:
        weights = _model_weights(checkpoint, model, spec, described, exclude, notes)
    elif described:
        weights = _described_weights(checkpoint, described, exclude, notes)
    else:
        weights = _inferred_weights(checkpoint, exclude, assume_plain, notes)
    if not weights:
        nested = [key for key, value in checkpoint.state_dict.items() if isinstance(value, Mapping)]
        why = [f"it holds {one_line(nested[0])} (a training checkpoint? pass its state_dict)"] if nested else []
        raise CheckpointError(one_line(
            f"{checkpoint.path}: no trackable weight among its {len(checkpoint.state_dict)} keys (tensors of 2+ dims "
            f"named 'weight', 'weight_*', '*_weight' or '*_weights'){''.join(f'; {n}' for n in [*why, *notes])}", MESSAGE
        ))
    assumed = [w.name for w in weights if not w.exact]
    if assumed:
        notes.append(
            f"(assumed) layouts are guessed for {', '.join(assumed)}: a convolution read as plain (dim 0 = output "
            "channel, 1 group, not transposed), a 2-D tensor as a Linear weight; pass the model (--model MODULE:FACTORY), "
            "or save the checkpoint from a registered model, for exact layouts"
        )
    return Reading(checkpoint, spec, weights, notes, assume_plain)


def _refuse_ambiguous(checkpoint: Checkpoint) -> None:
    """Refuse a state_dict that holds one weight twice (``fc.weight`` beside
    ``fc.parametrizations.weight.original``), or a description that cannot be read."""
    state_dict = checkpoint.state_dict
    for key in state_dict:
        original = parse_original_key(key)
        if original is not None and original[2] == "original" and original[0] + original[1] in state_dict:
            name = original[0] + original[1]
            raise CheckpointError(
                f"{one_line(checkpoint.path)} holds {one_line(name)} twice, as {one_line(name)} and {one_line(key)}: "
                "a state_dict holds one of them; keep the one the model was saved with"
            )
        if is_description_key(key) and damaged(state_dict[key]):
            path, tensor_name, _, _ = parse_link_key(key)
            raise CheckpointError(
                f"{one_line(checkpoint.path)}: the description of {one_line(path + tensor_name)} ({one_line(key)}) cannot be "
                "read (truncated, altered or averaged); nothing can tell its layout and spec: restore it from the saved file"
            )


def _bare(state_dict: Mapping[str, object]) -> Checkpoint:
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    odd = [key for key in state_dict if not isinstance(key, str)]
    if odd:
        raise TypeError(f"a state_dict's keys are names (str), got {one_line(repr(odd[0]))} ({type(odd[0]).__name__})")
    if not isinstance(state_dict, dict):  # a read-only mapping: the result is a dict of its items (the input is never changed)
        state_dict = OrderedDict(state_dict.items())
    return Checkpoint("state_dict", state_dict, state_dict, None)


def _warn(notes: Sequence[str]) -> None:
    for note in notes:
        warnings.warn(note, stacklevel=3)


def _choose_spec(
    path: str, saved: Sequence[ChipSpec], spec: ChipSpec | None, overrides: Mapping[str, object], notes: list[str]
) -> ChipSpec:
    distinct = sorted(set(saved), key=repr)
    if spec is None and len(distinct) > 1 and not overrides:
        raise CheckpointError(
            f"{one_line(path)}: its weights were registered with different specs "
            f"({'; '.join(one_line(repr(s)) for s in distinct)}): choose one (spec=, or --chip, --limit, --group-size, --bits)"
        )
    base = spec if spec is not None else distinct[0] if len(distinct) == 1 else ChipSpec()
    chosen = dataclasses.replace(base, **overrides)
    differing = [s for s in distinct if s.essentials != chosen.essentials]
    if differing:
        notes.append(f"the checkpoint was saved with {', '.join(one_line(repr(s)) for s in differing)}; using {chosen!r}, as asked")
    return chosen


# --- reading a weight --------------------------------------------------------------------------


def _check_readable(name: str, value: Tensor) -> None:
    """Refuse what functional.project cannot compute with, or not one value per element, naming the way out."""
    shown = one_line(name)
    if not isinstance(value, Tensor):
        raise CheckpointError(f"{shown} holds a {type(value).__name__}, not a tensor: a weight is a tensor; fix the state_dict, or exclude {shown}")
    if value.layout != torch.strided:
        problem = f"is a sparse tensor ({value.layout}): nwave_param reads dense weights; save it dense (tensor.to_dense())"
    elif value.dtype not in DTYPES:
        problem = f"has dtype {value.dtype}: nwave_param checks float16, bfloat16, float32 and float64 weights; convert it"
    elif value.is_meta:
        problem = "is a meta tensor, saved without its values (a model built on the meta device?): save the model once its weights are materialized"
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


def _described_weights(checkpoint: Checkpoint, described: Mapping, exclude: Sequence[str], notes: list[str]) -> list[Weight]:
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
        notes.append(f"skipped {', '.join(chained)}: stored through other parametrizations; pass the model to read them")
    if missing:
        notes.append(f"described, but their tensors are missing from the file: {', '.join(missing)}")
    untracked = []
    for key, value in state_dict.items():  # weights, plain or registered, that no description names
        original = parse_original_key(key)
        name = original[0] + original[1] if original and original[2] == "original" else key if is_weight_name(key.rpartition(".")[2]) else None
        if name not in described and name is not None and isinstance(value, Tensor) and value.dim() >= 2 and view_of(value) not in seen:
            untracked.append(name)
    if untracked:
        notes.append(f"not tracked by the registration the file was saved from (as in Python): {', '.join(untracked)}")
    return list(weights.values())


def _inferred_weights(checkpoint: Checkpoint, exclude: Sequence[str], assume_plain: bool, notes: list[str]) -> list[Weight]:
    """The tracked weights of a file that does not describe them, layouts from names and shapes.

    Certain: 2-D weights (a Linear's) and RNN-family weights (gates from the ``weight_hh``
    shapes).  Guessed: convolution-shaped tensors (read as plain convolutions) and, only with
    ``assume_plain``, 2-D ``*embed*`` tensors (read as Linear weights; excluded otherwise).
    """
    state_dict = checkpoint.state_dict
    keys = weight_keys(state_dict, notes)
    values = {name: state_dict[key] for name, key in keys.items()}
    candidates = [n for n, v in values.items() if is_weight_name(n.rpartition(".")[2]) and v.dim() >= 2]
    _note(notes, unmatched(exclude, candidates))
    weights: dict[str, Weight] = {}
    embeddings, seen, left_out = [], {}, set()
    for name in candidates:
        value = values[name]
        embedding = value.dim() == 2 and fnmatch.fnmatchcase(name.lower(), EMBEDDING)
        if embedding and not assume_plain and not excluded(name, exclude):
            embeddings.append(name)
        if excluded(name, exclude) or (embedding and not assume_plain) or view_of(value) in left_out:
            if view_of(value) not in seen:  # a tie's first name decides: the others are left out with it
                left_out.add(view_of(value))
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


def _model_weights(
    checkpoint: Checkpoint, model: nn.Module, spec: ChipSpec, described: Mapping, exclude: Sequence[str], notes: list[str]
) -> list[Weight]:
    """The tracked weights with the exact layouts of ``model`` (a copy of it, registered afresh
    with ``spec``, loads the checkpoint); the values stay the checkpoint's own, in its own dtype."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state_dict = checkpoint.state_dict
    try:
        model = copy.deepcopy(model)
    except Exception as error:  # whatever the model holds that cannot be copied
        raise CheckpointError(f"model: copy.deepcopy cannot copy it ({type(error).__name__}: {one_line(error)}); pass a freshly built model") from None
    strip(model)  # the layouts are the model's own, whatever it was registered with
    expected = model.state_dict()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            reg = register(model, spec, exclude=exclude)
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"model: {one_line(error, MESSAGE)}") from None
        try:  # plain keys: the file's own spec may differ from the one asked for
            loadable = plain_state_dict(state_dict)
        except ValueError:
            loadable = state_dict
        else:
            _check_fits(checkpoint.path, expected, loadable)
        keys = {name: _key_of(name, state_dict) for name in reg.names}
        for name, key in keys.items():  # before the file's values go anywhere
            if key is not None:
                _check_readable(name, state_dict[key])
        try:
            model.load_state_dict(loadable)
        except RuntimeError as error:  # torch's message spans lines
            raise CheckpointError(f"{one_line(checkpoint.path)} does not load into the model: {one_line(' '.join(str(error).split()), MESSAGE)}") from None
    notes.extend(str(warning.message) for warning in caught)
    held = model.state_dict(keep_vars=True)
    with contextlib.suppress(ValueError):  # the file may hold the plain keys of a tied weight
        held = {**held, **plain_state_dict(held)}
    weights = []
    for name, value, layout in zip(reg.names, reg.latent_weights(), reg.layouts):
        if name in described and described[name][1].layout != layout:
            raise CheckpointError(
                f"{one_line(name)}: the model reads it with {layout}, but {one_line(checkpoint.path)} describes "
                f"{described[name][1].layout}: is it the model the checkpoint was saved from?"
            )
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


# --- projecting --------------------------------------------------------------------------------


def project(reading: Reading) -> tuple[Checkpoint, list[Tensor], list[dict]]:
    """The checkpoint holding each weight's projection, the new values, and what changed; refuses, changing
    nothing, weights it cannot project, guessed layouts (unless ``assume_plain``), and tied
    weights whose projections disagree."""
    weights = reading.weights
    problems = functional.unprojectable([w.name for w in weights], [w.value for w in weights])
    problems += [f"{w.name} is stored through other parametrizations (project the model in Python)" for w in weights if not w.keys]
    if problems:
        raise CheckpointError(f"cannot project: {'; '.join(map(one_line, problems))}; nothing was written")
    projected = [functional.project(w.value, w.layout, reading.spec) for w in weights]
    guessed = [
        f"{one_line(w.name)} ({int((p != w.value).sum())} of {w.value.numel()} values)"
        for w, p in zip(weights, projected) if not w.exact and not torch.equal(p, w.value)
    ]
    if guessed and not reading.assume_plain:
        raise CheckpointError(
            f"refusing to change weights whose layout is guessed: {', '.join(guessed)} (a convolution may be grouped "
            "or transposed, a 2-D *embed* tensor an embedding); pass the model (--model MODULE:FACTORY) for exact layouts, "
            "or assume_plain (--assume-plain) to project them as plain; nothing was written"
        )
    container, new_values = _with_projection(reading, projected)
    changes = [{"name": w.name, **w.to_dict(), **_change(w.value, new)} for w, new in zip(weights, new_values)]
    return _redescribed(reading.checkpoint, container, reading.spec), new_values, changes


def _change(old: Tensor, new: Tensor) -> dict:
    """What projection did to one weight: elements changed, L1 and max change."""
    difference = (new.to(torch.float64) - old.to(torch.float64)).abs()
    return {
        "shape": list(old.shape),
        "numel": old.numel(),
        "changed": int((new != old).sum()),
        "l1_change": float(difference.sum()),
        "max_change": float(difference.max()) if old.numel() else 0.0,
    }


def _with_projection(reading: Reading, projected: Sequence[Tensor]) -> tuple[object, list[Tensor]]:
    """The container holding the projected values, and each weight's new tensor there.

    Memory shared in the input stays shared (tied keys, views), so each key must read back its
    own projection: weights sharing memory whose projections disagree are refused.
    """
    checkpoint, weights = reading.checkpoint, reading.weights
    state_dict = checkpoint.state_dict
    targets = [(state_dict[key], p) for w, p in zip(weights, projected) for key in w.keys]
    container, counterpart = with_values(checkpoint.container, targets)
    clashing = {storage_of(old) for old, p in targets if not torch.equal(counterpart(old), p)}
    if clashing:
        involved = [one_line(w.name) for w in weights if storage_of(w.value) in clashing]
        raise CheckpointError(
            f"{', '.join(involved)} share memory, and their projections disagree (each read with its own layout); "
            "pass the model (--model MODULE:FACTORY), or exclude all but one of them; nothing was written"
        )
    tracked = {key for w in weights for key in w.keys}
    following = [
        key for key, value in state_dict.items()
        if key not in tracked and isinstance(value, Tensor) and not same_bits(counterpart(value), value)
    ]
    if following:
        reading.notes.append(f"changed with the weights they share memory with: {', '.join(following)}")
    return container, [counterpart(state_dict[w.keys[0]]) for w in weights]


def _redescribed(checkpoint: Checkpoint, container: object, spec: ChipSpec) -> Checkpoint:
    """``container``, its every description saying ``spec``, which its values are projected for,
    and keeping its layout and hardness (0 for a version 0.2 description, which has none), so
    that a model registered with ``spec`` loads it, and ``--plain`` hardens with it."""
    state_dict = container if checkpoint.under is None else container[checkpoint.under]
    described = redescribed(state_dict, spec)
    if described:
        state_dict = copy.copy(state_dict)  # keeps the order and _metadata
        state_dict.update(described)
        if checkpoint.under is None:
            container = state_dict
        else:
            container = copy.copy(container)
            container[checkpoint.under] = state_dict
    return dataclasses.replace(checkpoint, container=container, state_dict=state_dict)
