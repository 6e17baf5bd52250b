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
share memory is refused by name.  The command line (:mod:`nwave_param.checkpoints.cli`) is a shell over this.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nwave_param import functional
from nwave_param._engine.hardening import harden_all
from nwave_param.checkpoints import files
from nwave_param.checkpoints.files import Checkpoint
from nwave_param.checkpoints.reading import Weight, described_weights, inferred_weights, inner_state_dict, model_weights, redescribed
from nwave_param.core.discovery import patterns, stated_for, stated_layouts
from nwave_param.core.report import Report, build_report, layout_fields
from nwave_param.core.state import descriptions, is_description_key, original_key, parse_link_key, parse_original_key, plain_state_dict
from nwave_param.description import NewerDescriptionError, damaged, decode
from nwave_param.errors import MESSAGE, CheckpointError, CheckpointWarning, one_line
from nwave_param.layout import Layout
from nwave_param.sharing import same_bits, storage_of, with_values
from nwave_param.spec import ChipSpec

__all__ = ["check_state_dict", "project_state_dict"]


def check_state_dict(
    state_dict: Mapping[str, object],
    spec: ChipSpec | None = None,
    *,
    model: nn.Module | None = None,
    layouts: Mapping[str, Layout] | None = None,
    exclude: str | Sequence[str] = (),
    assume_plain: bool = False,
    max_bytes: int | None = None,
) -> Report:
    """The :class:`~nwave_param.Report` of the weights in ``state_dict``, as the chip ``spec`` holds them.

    What the reading noticed (guessed layouts, skipped keys) is issued as
    :class:`~nwave_param.errors.CheckpointWarning`, and each row says whether its layout is assumed.

    Args:
        state_dict: the checkpoint's state_dict (a mapping of names to tensors), or a loaded
            :class:`~nwave_param.checkpoints.files.Checkpoint`; it is left as it is.
        spec: the chip; None takes the spec the checkpoint was saved with (one registration's),
            else ``ChipSpec()``.
        model: the model the checkpoint is of (not registered, or registered: a copy is read,
            the model is left as it is): it gives the exact layouts.
        layouts: a weight's reading stated by hand, a dotted name or glob to a
            :class:`~nwave_param.Layout`, as :func:`~nwave_param.register` takes it: a plain
            checkpoint of the chip vendor's ``[in, out]`` weights reads right with
            ``layouts={"W": nwp.Layout(inputs_first=True)}``; with ``model``, it adds to the
            model's layouts, its registration's if it is registered, and may not contradict them.
        exclude: globs of weight names to leave out.
        assume_plain: also read 2-D ``*embed*`` tensors as Linear weights (excluded otherwise).
        max_bytes: refuse a state_dict whose tensors materialize more bytes (an expanded tensor
            counted in full), before any computation, as the command line's ``--max-bytes``;
            None: no bound.

    Returns:
        The :class:`~nwave_param.Report`: one row a weight, and ``is_mappable``.

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
            meta, expanded) or whose layout does not fit its shape, specs that disagree, or
            tensors that materialize more than ``max_bytes``.
        TypeError: ``state_dict`` is not a mapping with str keys, ``spec`` not a ChipSpec,
            ``model`` not a module, ``layouts`` not a mapping of names to Layouts, ``exclude``
            not a glob or globs, ``assume_plain`` not a bool, or ``max_bytes`` not an int.
        ValueError: ``max_bytes`` is not more than 0.
    """
    reading = read(_bare(state_dict), spec, model=model, layouts=layouts, exclude=exclude, assume_plain=assume_plain, max_bytes=max_bytes)
    _warn(reading.notes)
    return reading.report()


def project_state_dict(
    state_dict: Mapping[str, object],
    spec: ChipSpec | None = None,
    *,
    model: nn.Module | None = None,
    layouts: Mapping[str, Layout] | None = None,
    exclude: str | Sequence[str] = (),
    assume_plain: bool = False,
    max_bytes: int | None = None,
) -> tuple[Mapping[str, object], list[dict]]:
    """A new state_dict whose weights are what the chip holds (:func:`nwave_param.functional.project`
    of each: the L1-nearest mappable values), and what changed.

    ``state_dict`` is left as it is; the new one keeps its keys, order, ties and views, and its
    descriptions now say ``spec``.  What the reading noticed is issued as
    :class:`~nwave_param.errors.CheckpointWarning`, as by :func:`check_state_dict`.

    Args:
        state_dict: the checkpoint's state_dict, or a loaded
            :class:`~nwave_param.checkpoints.files.Checkpoint` (as the command line passes it).
        spec: the chip to project onto; None takes the spec the checkpoint was saved with, else
            ``ChipSpec()``.
        model: as :func:`check_state_dict`'s: the model, for exact layouts.
        layouts: as :func:`check_state_dict`'s: weights' readings stated by hand.
        exclude: globs of weight names to leave out (and unchanged).
        assume_plain: read 2-D ``*embed*`` tensors as Linear weights, and project the weights
            whose layout is guessed as plain (refused otherwise).
        max_bytes: as :func:`check_state_dict`'s: a bound on the bytes the tensors materialize.

    Returns:
        ``(new_state_dict, changes)``: the new state_dict (given a
        :class:`~nwave_param.checkpoints.files.Checkpoint`, a new one, the whole file's object
        projected), and one dict a weight (``name``, ``layout``, ``shape``, ``numel``,
        ``changed``, ``l1_change``, ``max_change``).

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
        TypeError: as :func:`check_state_dict`.
        ValueError: as :func:`check_state_dict`.
    """
    checkpoint = _bare(state_dict)
    reading = read(checkpoint, spec, model=model, layouts=layouts, exclude=exclude, assume_plain=assume_plain, max_bytes=max_bytes)
    projected, changes = project(reading)
    _warn(reading.notes)
    return (projected if checkpoint is state_dict else projected.state_dict), changes


@dataclass
class Reading:
    """What a checkpoint holds for the chip: the spec to hold it with, its weights, and notes."""

    checkpoint: Checkpoint
    spec: ChipSpec
    weights: list[Weight]
    notes: list[str]
    assume_plain: bool = False

    def report(self) -> Report:
        """The report of the weights, each as read (exact or assumed layout)."""
        weights = self.weights
        assumed = {w.name for w in weights if not w.exact}
        return build_report([w.name for w in weights], [w.value for w in weights], [w.layout for w in weights], self.spec, 2, assumed)


def read(
    checkpoint: Checkpoint,
    spec: ChipSpec | None = None,
    *,
    model: nn.Module | None = None,
    layouts: Mapping[str, Layout] | None = None,
    exclude: str | Sequence[str] = (),
    assume_plain: bool = False,
    max_bytes: int | None = None,
) -> Reading:
    """Choose the spec (``spec``, else the checkpoint's own), the weights and their layouts."""
    if spec is not None and not isinstance(spec, ChipSpec):
        raise TypeError(f"spec must be a ChipSpec, got {type(spec).__name__}")
    if not isinstance(assume_plain, bool):
        raise TypeError(f"assume_plain must be True or False, got {assume_plain!r}")
    if max_bytes is not None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool):
            raise TypeError(f"max_bytes must be an int (bytes) or None, got {max_bytes!r}")
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be more than 0 bytes, got {max_bytes}")
        files.refuse_computing_more(checkpoint.path, checkpoint.container, max_bytes, files.PYTHON)
    exclude = patterns(exclude)
    notes: list[str] = []
    _refuse_ambiguous(checkpoint)
    described = {
        path + tensor_name: (original_key(path, tensor_name) if position == 0 else None, saved)
        for _, (path, tensor_name, position, _), saved in descriptions(checkpoint.state_dict)
    }
    spec = _choose_spec(checkpoint.path, [saved.spec for _, saved in described.values()], spec, notes)
    stated = stated_layouts(layouts)
    if model is not None:
        weights = model_weights(checkpoint, model, spec, described, exclude, notes, stated)
    else:
        weights = (
            described_weights(checkpoint, described, exclude, notes)
            if described
            else inferred_weights(checkpoint, exclude, assume_plain, notes, stated)
        )
        weights = [_as_stated(checkpoint.path, weight, stated, described) for weight in weights]
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


def _as_stated(path: str, weight: Weight, stated: Mapping[str, Layout], described: Mapping) -> Weight:
    """``weight`` read with the layout ``layouts`` states for it, exact; refused where the file's
    description says another."""
    try:
        layout = stated_for(weight.name, stated)
        if layout is not None:
            layout.check(weight.value.shape, weight.name)
    except ValueError as error:
        raise CheckpointError(one_line(error, MESSAGE)) from None
    if layout is None:
        return weight
    if weight.name in described and layout != weight.layout:
        raise CheckpointError(
            f"{one_line(weight.name)}: layouts states {layout}, but {one_line(path)} describes {weight.layout}: "
            "state what the model computes"
        )
    return dataclasses.replace(weight, layout=layout, exact=True)


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
        if is_description_key(key):
            try:
                decode(state_dict[key])
            except NewerDescriptionError as error:
                path, tensor_name, _, _ = parse_link_key(key)
                raise CheckpointError(
                    f"{one_line(checkpoint.path)}: {one_line(path + tensor_name)} ({one_line(key)}) holds {error}"
                ) from None
        if is_description_key(key) and damaged(state_dict[key]):
            path, tensor_name, _, _ = parse_link_key(key)
            raise CheckpointError(
                f"{one_line(checkpoint.path)}: the description of {one_line(path + tensor_name)} ({one_line(key)}) cannot be "
                "read (truncated, altered or averaged); nothing can tell its layout and spec: restore it from the saved file"
            )


def _bare(state_dict: Mapping[str, object]) -> Checkpoint:
    if isinstance(state_dict, Checkpoint):
        return state_dict
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
        warnings.warn(note, CheckpointWarning, stacklevel=3)


def saved_spec(state_dict: Mapping[str, object]) -> ChipSpec | None:
    """The spec ``state_dict``'s descriptions say its weights were registered with, when they
    agree on one (else None): the base the command line's ``--limit``, ``--bits`` ... change."""
    specs = {saved.spec for *_, saved in descriptions(_bare(state_dict).state_dict)}
    return specs.pop() if len(specs) == 1 else None


def _choose_spec(path: str, saved: Sequence[ChipSpec], spec: ChipSpec | None, notes: list[str]) -> ChipSpec:
    distinct = sorted(set(saved), key=repr)
    if spec is None and len(distinct) > 1:
        raise CheckpointError(
            f"{one_line(path)}: its weights were registered with different specs "
            f"({'; '.join(one_line(repr(s)) for s in distinct)}): choose one (spec=, or --chip, --limit, --group-size, --bits)"
        )
    chosen = spec if spec is not None else distinct[0] if distinct else ChipSpec()
    differing = [s for s in distinct if s.essentials != chosen.essentials]
    if differing:
        notes.append(f"the checkpoint was saved with {', '.join(one_line(repr(s)) for s in differing)}; using {chosen!r}, as asked")
    return chosen


# --- projecting --------------------------------------------------------------------------------


def project(reading: Reading) -> tuple[Checkpoint, list[dict]]:
    """The checkpoint holding each weight's projection, and what changed; refuses, changing
    nothing, weights it cannot project, guessed layouts (unless ``assume_plain``), and tied
    weights whose projections disagree."""
    weights = reading.weights
    problems = functional.unprojectable([w.name for w in weights], [w.value for w in weights])
    problems += [f"{w.name} is stored through other parametrizations (project the model in Python)" for w in weights if not w.keys]
    if problems:
        raise CheckpointError(f"cannot project: {'; '.join(map(one_line, problems))}; nothing was changed")
    with torch.no_grad():  # what reg.project_() computes: every weight at once, equal to functional.project
        projected = harden_all([w.value for w in weights], [w.layout for w in weights], reading.spec, 1.0)
    guessed = [
        f"{one_line(w.name)} ({int((p != w.value).sum())} of {w.value.numel()} values)"
        for w, p in zip(weights, projected) if not w.exact and not torch.equal(p, w.value)
    ]
    if guessed and not reading.assume_plain:
        raise CheckpointError(
            f"refusing to change weights whose layout is guessed: {', '.join(guessed)} (a convolution may be grouped "
            "or transposed, a 2-D *embed* tensor an embedding); pass the model (--model MODULE:FACTORY) for exact layouts, "
            "or assume_plain (--assume-plain) to project them as plain; nothing was changed"
        )
    container, new_values = _with_projection(reading, projected)
    changes = [{"name": w.name, **layout_fields(w.layout, not w.exact), **_change(w.value, new)} for w, new in zip(weights, new_values)]
    return _redescribed(reading.checkpoint, container, reading.spec), changes


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
            "pass the model (--model MODULE:FACTORY), or exclude all but one of them; nothing was changed"
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


def plain_checkpoint(checkpoint: Checkpoint, names: Sequence[str], prefix: str | None, notes: list[str]) -> Checkpoint:
    """The checkpoint the command line's ``project --plain`` writes: the state_dict alone that the
    plain inner model loads with ``strict=True`` (:func:`~nwave_param.plain_state_dict`, then the
    keys under ``prefix`` without it; by default, the inner model's of a Lightning checkpoint or
    an AveragedModel, found from the tracked weights' ``names``)."""
    found: list[str] = []
    try:
        plain = plain_state_dict(checkpoint.state_dict)
    except ValueError as error:
        raise CheckpointError(f"--plain: {one_line(error, MESSAGE)}") from None
    try:
        inner = inner_state_dict(plain, prefix, names, checkpoint.under == "state_dict", found)
    except ValueError as error:  # the prefix given, or the one found, does not hold the inner model alone
        raise CheckpointError(f"--plain --prefix: {one_line(error, MESSAGE)}") from None
    notes += [f"--plain: {note}" for note in found]
    return Checkpoint(checkpoint.path, inner, inner, None, checkpoint.metadata)
