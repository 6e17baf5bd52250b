"""The ``nwave-param`` command line: check and project checkpoints, run the demo.

::

    nwave-param check CHECKPOINT [options]             # the report; exit 0 mappable, 1 not mappable
    nwave-param project CHECKPOINT -o OUT [options]    # write the L1-nearest mappable checkpoint
    nwave-param demo [--quick] [--epochs N] [--json[=PATH]] [--plot PATH]

Every error is one line on stderr and exit status 2; exit 1 means only "not mappable" (check).
What comes from a file or from user code (names, paths, messages) is escaped and cut to fit that
line, in the text output too.  ``--json`` prints strict JSON on stdout instead of the text (a
number that is not finite is ``null``, and ``"not_finite"`` beside it says what it was);
``--json=PATH`` prints the text and also writes the JSON to PATH.  The path is attached with
``=``, as GNU tools take an optional argument, so ``check --json model.pt`` never takes the
checkpoint for the JSON file.

Where a weight's layout comes from, most trusted first: ``--model`` (the model's own); the
description a registered model saves beside each weight (no flag needed); the names and shapes of
2-D and RNN-family weights.  Anything else is guessed ("assumed"): a convolution-shaped tensor may
be grouped or transposed, a 2-D ``*embed*`` tensor may be an embedding.  ``project`` never changes
a guessed weight unless ``--assume-plain`` says so.  Every layout is checked against its tensor's
shape before any computation, and a weight whose elements share memory is refused by name.

The outputs of one command (``-o``, ``--json=PATH``) are written to temporary files and renamed
into place together once all are complete; SIGINT and SIGTERM before that remove them.  The
``--model`` factory runs guarded: its prints go to stderr, and the working directory and
``sys.path`` are restored after it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import importlib
import json
import math
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import __version__, functional
from . import checkpoint as files
from .checkpoint import Checkpoint, CliError, one_line
from .description import Description, decode, encode
from .discovery import is_weight_name
from .layout import Layout
from .registry import register
from .report import Report, aligned, build_report
from .spec import H1V1, H1V2, ChipSpec
from .state import original_key, parse_link_key, parse_original_key, plain_state_dict

__all__ = ["main"]

CHIPS = {"h1v1": H1V1, "h1v2": H1V2}
SPEC_OPTIONS = {"limit": "--limit", "group_size": "--group-size", "bits": "--bits"}  # ChipSpec field -> option
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what functional.project computes in
DEFAULT_MAX_BYTES = "4G"
EMBEDDING = "*embed*"
MESSAGE = 2000  # characters of a whole message or note, its pieces from outside cut already
AVERAGED = "n_averaged"  # the buffer torch.optim.swa_utils.AveragedModel keeps beside its module.*


@dataclass
class Weight:
    """A tracked weight: its name, the state_dict keys holding it, its value and layout.

    ``keys`` lists every key of a tied weight (the first one is read, all are written); it is
    empty for a weight stored through other parametrizations (readable only with --model).
    ``exact`` is False where the layout is guessed.
    """

    name: str
    keys: tuple[str, ...]
    value: Tensor
    layout: Layout
    exact: bool


@dataclass(frozen=True)
class Described:
    """A weight's description in the checkpoint: the key of its latent value (None when other
    parametrizations come before nwave_param's), its layout and spec."""

    key: str | None
    layout: Layout
    spec: ChipSpec


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _note_unmatched(patterns: Sequence[str], names: Sequence[str], notes: list[str]) -> None:
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        notes.append(f"--exclude {' '.join(unmatched)} matched no weight")


def _listed(names: Sequence[str]) -> str:
    return ", ".join(map(one_line, names))


def _check_readable(name: str, value: Tensor) -> None:
    """Refuse what functional.project cannot compute with, or not one value per element, naming the way out."""
    shown = one_line(name)
    if value.layout != torch.strided:
        raise CliError(
            f"{shown} is a sparse tensor ({value.layout}): nwave_param reads dense weights; "
            f"save it dense (tensor.to_dense()) or pass --exclude {shown}"
        )
    if value.dtype not in DTYPES:
        raise CliError(
            f"{shown} has dtype {value.dtype}: nwave_param checks float16, bfloat16, float32 and float64 "
            f"weights; convert it, or pass --exclude {shown}"
        )
    if value.is_meta:
        raise CliError(
            f"{shown} is a meta tensor, saved without its values (a model built on the meta device?): "
            f"save the model once its weights are materialized, or pass --exclude {shown}"
        )
    sharing = _memory_sharing(value)
    if sharing:
        raise CliError(
            f"{shown} {sharing}: the chip holds one value per element; save it with .contiguous(), "
            f"or pass --exclude {shown}"
        )


def _memory_sharing(value: Tensor) -> str | None:
    """How the elements of ``value`` share memory, said for an error; None when each has its own.

    Each has its own when, taking the dims by increasing stride, every stride reaches past all
    the elements the smaller ones span: true of every view slicing, transposing and reshaping
    make; an expanded tensor (stride 0) or an unfolded one breaks it, and an as_strided one may.
    """
    shape, strides = tuple(value.shape), value.stride()
    if value.numel() == 0:
        return None
    expanded = [d for d, (size, step) in enumerate(zip(shape, strides)) if step == 0 and size > 1]
    if expanded:
        d = expanded[0]
        return f"is an expanded tensor of shape {shape} (stride 0 along dim {d}: one stored value read {shape[d]} times)"
    span = 0
    for step, size in sorted((step, size) for step, size in zip(strides, shape) if size > 1):
        if step <= span:
            return f"is stored with strides {strides} for its shape {shape}, under which its elements may share memory (an unfold or as_strided view)"
        span += step * (size - 1)
    return None


def _check_layout(path: str, name: str, shape: torch.Size, layout: Layout) -> None:
    """Refuse, naming the weight, a layout that cannot read a tensor of ``shape``, before any
    computation: the gates split the output rows, the groups split dim 0 (the output rows, or a
    transposed convolution's input channels)."""
    problems = []
    if len(shape) < 2:
        problems.append("a tracked weight has 2 or more dims")
    else:
        rows = layout.rows(shape)
        if rows % layout.gates:
            problems.append(f"its {rows} output rows do not split into {layout.gates} gates")
        if shape[0] % layout.groups:
            problems.append(f"dim 0 ({shape[0]}) does not split into {layout.groups} groups")
    if problems:
        raise CliError(
            f"{one_line(path)}: {one_line(name)} of shape {tuple(shape)} cannot be read with {layout}: "
            f"{'; '.join(problems)}; pass --model MODULE:FACTORY for the model's own layouts, or --exclude {one_line(name)}"
        )


# --- the spec ----------------------------------------------------------------------------------


def _check_spec_options(args: argparse.Namespace) -> None:
    for field, option in SPEC_OPTIONS.items():
        value = getattr(args, field)
        if value is not None:
            try:
                ChipSpec(**{field: value})
            except ValueError as error:
                raise CliError(f"{option} {value}: {str(error).removeprefix('ChipSpec: ')}") from None


def resolve_spec(args: argparse.Namespace, saved: Sequence[ChipSpec], notes: list[str]) -> ChipSpec:
    """The options' spec, on top of ``--chip`` or else the checkpoint's own (H1v1 without one)."""
    given = {field: getattr(args, field) for field in SPEC_OPTIONS if getattr(args, field) is not None}
    distinct = sorted(set(saved), key=repr)
    if args.chip:
        base = CHIPS[args.chip]
    elif len(distinct) == 1:
        base = distinct[0]
    elif distinct and not given:
        raise CliError(
            f"{one_line(args.checkpoint)}: its weights were registered with different specs "
            f"({'; '.join(one_line(repr(s)) for s in distinct)}): choose one with --chip, --limit, --group-size or --bits"
        )
    else:
        base = ChipSpec()
    spec = dataclasses.replace(base, **given)
    differing = [s for s in distinct if s.essentials != spec.essentials]
    if differing:
        notes.append(
            f"the checkpoint was saved with {', '.join(one_line(repr(s)) for s in differing)}; using {spec!r}, as the options ask"
        )
    return spec


# --- which weights, and their layouts ----------------------------------------------------------


def _descriptions(state_dict: Mapping[str, object]) -> Iterator[tuple[str, tuple[str, str, int, str], Description]]:
    """``(key, link, description)`` for each of nwave_param's descriptions in ``state_dict``."""
    for key, value in state_dict.items():
        link = parse_link_key(key)
        saved = decode(value) if link and link[3] == "_extra_state" else None
        if saved is not None:
            yield key, link, saved


def read_descriptions(state_dict: Mapping[str, object]) -> dict[str, Described]:
    """The weights a registered model described in its state_dict, by name."""
    found = {}
    for _, (path, tensor_name, position, _), saved in _descriptions(state_dict):
        latent = original_key(path, tensor_name) if position == 0 else None
        found[path + tensor_name] = Described(latent, saved.layout, saved.spec)
    return found


def _refuse_tied_across_layouts(first: Weight, key: str, layout: Layout) -> None:
    if layout != first.layout:
        raise CliError(
            f"{one_line(first.keys[0])} and {one_line(key)} hold one tensor but read it with different layouts "
            f"({first.layout} and {layout}): the chip holds a different value for each; untie them, "
            f"or pass --exclude for one of them"
        )


def described_weights(
    checkpoint: Checkpoint, descriptions: Mapping[str, Described], exclude: Sequence[str], notes: list[str]
) -> list[Weight]:
    """The weights the file describes, with their exact layouts (the registration's choice of weights)."""
    state_dict = checkpoint.state_dict
    _note_unmatched(exclude, list(descriptions), notes)
    weights: list[Weight] = []
    chained, missing, seen = [], [], {}
    for name, described in descriptions.items():
        if _matches(name, exclude):
            continue
        if described.key is None:
            chained.append(name)
            continue
        value = state_dict.get(described.key)
        if not isinstance(value, Tensor):
            missing.append(name)
            continue
        _check_readable(name, value)
        _check_layout(checkpoint.path, name, value.shape, described.layout)
        view = files.view_of(value)
        if view in seen:  # a tied weight: tracked once, by its first name, as register() does
            _refuse_tied_across_layouts(seen[view], described.key, described.layout)
            seen[view].keys += (described.key,)
            continue
        seen[view] = Weight(name, (described.key,), value, described.layout, True)
        weights.append(seen[view])
    if chained:
        notes.append(f"skipped {', '.join(chained)}: stored through other parametrizations; pass --model to read them")
    if missing:
        notes.append(f"described, but their tensors are missing from the file: {', '.join(missing)}")
    untracked = [
        key for key, value in state_dict.items()
        if isinstance(value, Tensor) and value.dim() >= 2 and is_weight_name(key.rpartition(".")[2])
        and files.view_of(value) not in seen
    ]
    if untracked:
        notes.append(f"not tracked by the registration the file was saved from (as in Python): {', '.join(untracked)}")
    return weights


_RNN = re.compile(r"^weight_(?:ih|hh)(?P<suffix>_l\d+(?:_reverse)?)?$")


def _gates(name: str, weights: Mapping[str, Tensor]) -> int:
    """Gate count of an RNN-family ``weight_ih*``/``weight_hh*``, from the ``weight_hh`` shapes."""
    path, _, local = name.rpartition(".")
    prefix = f"{path}." if path else ""
    suffix = _RNN.match(local).group("suffix") or ""
    hh = weights.get(f"{prefix}weight_hh{suffix}")
    if hh is None or hh.dim() != 2:
        raise CliError(f"cannot tell the gates of {one_line(name)}: no 2-d {one_line(prefix)}weight_hh{suffix} beside it")
    hr = weights.get(f"{prefix}weight_hr{suffix}")
    hidden = hr.shape[1] if hr is not None and hr.dim() == 2 else hh.shape[1]
    gates, rest = divmod(hh.shape[0], hidden) if hidden else (0, 1)
    if rest or gates not in (1, 3, 4):
        raise CliError(
            f"{one_line(name)}: {one_line(prefix)}weight_hh{suffix} of shape {tuple(hh.shape)} fits no RNN, GRU or LSTM layout"
        )
    return gates


def _by_weight_name(state_dict: Mapping[str, object], notes: list[str]) -> dict[str, str]:
    """Weight name -> key of its tensor; registered keys (``*.parametrizations.*.original``) by their weight's name."""
    found: dict[str, str] = {}
    chained = set()
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        original = parse_original_key(key)
        if original is None:
            found.setdefault(key, key)
            continue
        path, tensor_name, stored = original
        name = path + tensor_name
        if stored == "original":
            found[name] = key
        else:
            chained.add(name)
    if chained:
        names = ", ".join(sorted(chained))
        notes.append(f"skipped {names}: stored through other parametrizations; pass --model to read them")
    return found


def inferred_weights(checkpoint: Checkpoint, exclude: Sequence[str], assume_plain: bool, notes: list[str]) -> list[Weight]:
    """The tracked weights of a file that does not describe them, layouts from names and shapes.

    Certain: 2-D weights (a Linear's) and RNN-family weights (gates from the ``weight_hh``
    shapes).  Guessed: convolution-shaped tensors (read as plain convolutions) and, only with
    ``assume_plain``, 2-D ``*embed*`` tensors (read as Linear weights; excluded otherwise).
    """
    state_dict = checkpoint.state_dict
    keys = _by_weight_name(state_dict, notes)
    values = {name: state_dict[key] for name, key in keys.items()}
    candidates = [n for n, v in values.items() if is_weight_name(n.rpartition(".")[2]) and v.dim() >= 2]
    _note_unmatched(exclude, candidates, notes)
    weights: list[Weight] = []
    embeddings, seen = [], {}
    for name in candidates:
        value, key = values[name], keys[name]
        if _matches(name, exclude):
            seen.setdefault(files.view_of(value), None)  # its ties are excluded with it
            continue
        embedding = value.dim() == 2 and fnmatch.fnmatchcase(name.lower(), EMBEDDING)
        if embedding and not assume_plain:
            embeddings.append(name)
            seen.setdefault(files.view_of(value), None)
            continue
        _check_readable(name, value)
        gated = _RNN.match(name.rpartition(".")[2])
        layout = Layout(gates=_gates(name, values)) if gated else Layout()
        _check_layout(checkpoint.path, name, value.shape, layout)
        view = files.view_of(value)
        if view in seen:  # a tied weight: its first name decides, as register() lists it once
            if seen[view] is not None:
                _refuse_tied_across_layouts(seen[view], key, layout)
                seen[view].keys += (key,)
            continue
        seen[view] = Weight(name, (key,), value, layout, exact=value.dim() == 2 and not embedding)
        weights.append(seen[view])
    if embeddings:
        notes.append(
            f"excluded as embeddings (nwave_param never tracks nn.Embedding): {', '.join(embeddings)}; "
            "pass --assume-plain to read them as Linear weights"
        )
    return weights


# --- the user's model --------------------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """What is printed to stdout, by Python or below it (a C library, a child process), goes to
    stderr: stdout carries --json alone."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at the level of file descriptors: nothing to protect
        saved = None
    if saved is not None:
        try:
            os.dup2(2, 1)
        except OSError:  # no stderr to send it to
            os.close(saved)
            saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def _users_code(what: str) -> Iterator[None]:
    """Run the user's code (``--model``'s module, its factory, its model's hooks) as a guarded call.

    What it prints goes to stderr; the working directory and ``sys.path`` are restored after it;
    its ``sys.exit`` and its exceptions become a one-line error naming ``what``.
    """
    directory, path = os.getcwd(), list(sys.path)
    try:
        with _stdout_to_stderr():
            yield
    except CliError:
        raise
    except SystemExit as exit:
        raise CliError(f"{what} called sys.exit({one_line(repr(exit.code))}) instead of returning the model") from None
    except Exception as error:  # the user's code: report it on one line
        raise CliError(f"{what}: {type(error).__name__}: {one_line(error)}") from None
    finally:
        sys.path[:] = path
        try:
            os.chdir(directory)
        except OSError as error:
            raise CliError(f"{what} left the working directory {one_line(directory)}, which cannot be entered again: {error.strerror}") from None


def _build_model(factory_path: str) -> nn.Module:
    module_name, _, attribute = factory_path.partition(":")
    if not module_name or not attribute:
        raise CliError(f"--model takes MODULE:FACTORY (e.g. mypkg.models:make_net), got {one_line(repr(factory_path))}")
    sys.path.insert(0, os.getcwd())  # a console script does not see the working directory; _users_code takes it out
    model = getattr(importlib.import_module(module_name), attribute)()
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {one_line(factory_path)} returned {type(model).__name__}, not an nn.Module")
    return model


def model_weights(
    args: argparse.Namespace, checkpoint: Checkpoint, spec: ChipSpec, descriptions: Mapping[str, Described], notes: list[str]
) -> list[Weight]:
    """The tracked weights with the exact layouts of the model ``--model`` builds; the values stay
    the checkpoint's own, in its own dtype."""
    state_dict = checkpoint.state_dict
    what = f"--model {one_line(args.model)}"
    with warnings.catch_warnings(record=True) as caught, _users_code(what):
        warnings.simplefilter("always")
        model = _build_model(args.model)
        reg = register(model, spec, exclude=args.exclude)
        keys = {name: _key_of(name, state_dict) for name in reg.names}
        for name, key in keys.items():  # before the file's values go anywhere
            if key is not None:
                _check_readable(name, state_dict[key])
        try:  # plain keys: the file's own spec may differ from the one asked for
            loadable = plain_state_dict(state_dict)
        except ValueError:
            loadable = state_dict
        model.load_state_dict(loadable)
    notes.extend(str(warning.message) for warning in caught)
    held = model.state_dict(keep_vars=True)
    with contextlib.suppress(ValueError):  # the file may hold the plain keys of a tied weight
        held = {**held, **plain_state_dict(held)}
    weights = []
    for name, value, layout in zip(reg.names, reg.latent_weights(), reg.layouts):
        described = descriptions.get(name)
        if described is not None and described.layout != layout:
            raise CliError(
                f"{one_line(name)}: {what} reads it with {layout}, but {one_line(checkpoint.path)} describes "
                f"{described.layout}: is it the model the checkpoint was saved from?"
            )
        key = keys[name]
        aliases = tuple(k for k, t in held.items() if t is value and k != key and k in state_dict)  # tied keys
        stored = state_dict[key] if key is not None else value.detach()
        _check_readable(name, stored)
        _check_layout(checkpoint.path, name, stored.shape, layout)
        weights.append(Weight(name, (key, *aliases) if key is not None else (), stored, layout, True))
    return weights


def _key_of(name: str, state_dict: Mapping[str, object]) -> str | None:
    """The key holding weight ``name`` in ``state_dict``: its plain or its registered key."""
    path, _, local = name.rpartition(".")
    registered = original_key(f"{path}." if path else "", local)
    return next((k for k in (name, registered) if k in state_dict), None)


def gather(args: argparse.Namespace) -> tuple[Checkpoint, ChipSpec, list[Weight], list[str]]:
    """Load the checkpoint; choose the spec, the weights and their layouts; collect notes."""
    _check_spec_options(args)
    checkpoint = files.load(args.checkpoint, args.max_bytes)
    notes: list[str] = []
    descriptions = read_descriptions(checkpoint.state_dict)
    spec = resolve_spec(args, [d.spec for d in descriptions.values()], notes)
    if args.model:
        weights = model_weights(args, checkpoint, spec, descriptions, notes)
    elif descriptions:
        weights = described_weights(checkpoint, descriptions, args.exclude, notes)
    else:
        weights = inferred_weights(checkpoint, args.exclude, args.assume_plain, notes)
    if not weights:
        raise CliError(
            f"{one_line(args.checkpoint)}: no trackable weight among its {len(checkpoint.state_dict)} keys "
            "(tensors of 2+ dims named 'weight', 'weight_*', '*_weight' or '*_weights')"
        )
    assumed = [w.name for w in weights if not w.exact]
    if assumed:
        notes.append(
            f"(assumed) layouts are guessed for {', '.join(assumed)}: a convolution read as plain (dim 0 = output "
            "channel, 1 group, not transposed), a 2-D tensor as a Linear weight; pass --model MODULE:FACTORY, or "
            "save the checkpoint from a registered model, for exact layouts"
        )
    return checkpoint, spec, weights, notes


# --- output ------------------------------------------------------------------------------------


def _report(weights: Sequence[Weight], values: Sequence[Tensor], spec: ChipSpec) -> Report:
    return build_report([w.name for w in weights], list(values), [w.layout for w in weights], spec, 2)


def _report_data(report: Report) -> dict:
    """``report.to_dict()`` with its floats as computed, so that :func:`_strict` says what one that is
    not finite was (``to_dict`` makes it None, without a word)."""
    data = report.to_dict()
    for entry, row in zip(data["rows"], report.rows):
        entry.update({key: getattr(row, key) for key in ("max_abs", "magnitude", "topology")})
    data["totals"].update({key: value for key, value in report.totals.items() if isinstance(value, float)})
    return data


def _marked(report: Report, weights: Sequence[Weight]) -> Report:
    """The report for the text: each name on one line, with "(assumed)" after it where the layout is guessed."""
    rows = [
        dataclasses.replace(row, name=one_line(row.name) + ("" if w.exact else " (assumed)"))
        for row, w in zip(report.rows, weights)
    ]
    return Report(rows, report.spec, report.power)


def _reading(weight: Weight) -> dict:
    return {"layout": "exact" if weight.exact else "assumed", **weight.layout.to_dict()}


def _strict(value: object) -> object:
    """``value`` for strict JSON: a float that is not finite becomes None, and the object holding
    it says what it was under ``"not_finite"`` (``{"l1_change": "inf"}``)."""
    if isinstance(value, Mapping):
        result, what = {}, {}
        for key, item in value.items():
            if isinstance(item, float) and not math.isfinite(item):
                result[key], what[key] = None, repr(item)
            else:
                result[key] = _strict(item)
        return {**result, "not_finite": what} if what else result
    if isinstance(value, (list, tuple)):
        return [None if isinstance(item, float) and not math.isfinite(item) else _strict(item) for item in value]
    return value


def _finish(args: argparse.Namespace, outputs: files.Outputs, data: dict, text: str) -> None:
    """Add the JSON file to the outputs (``--json=PATH``), rename every output into place, then
    print the JSON (``--json``) or the text."""
    rendered = json.dumps(_strict(data), indent=2, allow_nan=False)
    if args.json not in (None, "-"):
        outputs.add_text(args.json, rendered + "\n")
    _INTERRUPTIONS.defer()  # from here the command completes: what it prints is what is on disk
    outputs.commit()
    print(rendered if args.json == "-" else text)


def _with_notes(text: str, notes: Sequence[str]) -> str:
    return "\n".join([text, *(f"note: {one_line(note, MESSAGE)}" for note in notes)])


_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def _check_destinations(destinations: Sequence[tuple[str, str]], source: str | None = None) -> None:
    """Before any work: an output is a regular file or new (never a directory, FIFO, device or
    socket, which renaming the output into place would replace), its directory exists, and it is
    never the input."""
    for option, path in destinations:
        shown = one_line(path)
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as error:
            raise CliError(f"cannot write {option} {shown}: {error.strerror}") from None
        if mode is not None and not stat.S_ISREG(mode):
            kind = next((kind for test, kind in _KINDS.items() if test(mode)), "not a regular file")
            raise CliError(f"{option} {shown} is {kind}: nwave-param writes regular files only; choose a file path")
        directory = os.path.dirname(os.path.realpath(path))
        if not os.path.isdir(directory):
            raise CliError(f"cannot write {shown}: no directory {one_line(directory)}")
        if source is not None and mode is not None and os.path.exists(source) and os.path.samefile(path, source):
            raise CliError(f"refusing to overwrite the input {one_line(source)}: choose another {option}")
    targets = [os.path.realpath(path) for _, path in destinations]
    if len(set(targets)) < len(targets):
        raise CliError(f"{' and '.join(option for option, _ in destinations)} name the same file")


def _json_destinations(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("--json", args.json)] if args.json not in (None, "-") else []


def run_check(args: argparse.Namespace) -> int:
    _check_destinations(_json_destinations(args), args.checkpoint)
    checkpoint, spec, weights, notes = gather(args)
    report = _report(weights, [w.value for w in weights], spec)
    data = {"checkpoint": args.checkpoint, **_report_data(report), "notes": notes}
    for row, weight in zip(data["rows"], weights):
        row.update(_reading(weight))
    with files.Outputs() as outputs:
        _finish(args, outputs, data, _with_notes(str(_marked(report, weights)), notes))
    return 0 if report.is_mappable else 1


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.dtype != b.dtype or a.shape != b.shape or a.layout != torch.strided or b.layout != torch.strided:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _change(weight: Weight, new: Tensor) -> dict:
    """What projection did to one weight: elements changed, L1 and max change."""
    old = weight.value
    difference = (new.to(torch.float64) - old.to(torch.float64)).abs()
    return {
        "name": weight.name,
        **_reading(weight),
        "shape": list(old.shape),
        "numel": old.numel(),
        "changed": int((new != old).sum()),
        "l1_change": float(difference.sum()),
        "max_change": float(difference.max()) if old.numel() else 0.0,
    }


def _change_table(changes: Sequence[dict]) -> str:
    columns = ("name", "layout", "changed", "numel", "l1_change", "max_change")
    lines = [columns] + [
        tuple(f"{c[k]:.4g}" if isinstance(c[k], float) else one_line(c[k]) for k in columns) for c in changes
    ]
    return "\n".join(aligned(lines))


def _summary(label: str, report: Report) -> str:
    totals = report.totals
    return (
        f"{label}: max |w| {totals['max_abs']:.4g}, {totals['out_of_range']} of {totals['numel']} weights "
        f"out of range, {totals['mixed_block_columns']} of {totals['block_columns']} block columns mixed, "
        f"{'mappable' if report.is_mappable else 'NOT mappable'}"
    )


def _refuse_unprojectable(weights: Sequence[Weight]) -> None:
    problems = [f"{one_line(w.name)} holds NaN or infinite values" for w in weights if not bool(torch.isfinite(w.value).all())]
    problems += [
        f"{one_line(w.name)} is stored through other parametrizations (project the model in Python)" for w in weights if not w.keys
    ]
    if problems:
        raise CliError(f"cannot project: {'; '.join(problems)}; nothing was written")


def _refuse_guessed(weights: Sequence[Weight], projected: Sequence[Tensor]) -> None:
    guessed = [
        f"{one_line(w.name)} ({int((p != w.value).sum())} of {w.value.numel()} values)"
        for w, p in zip(weights, projected)
        if not w.exact and not torch.equal(p, w.value)
    ]
    if guessed:
        raise CliError(
            f"refusing to change weights whose layout is guessed: {', '.join(guessed)} (a convolution may be grouped "
            "or transposed, a 2-D *embed* tensor an embedding); pass --model MODULE:FACTORY for exact layouts, or "
            "--assume-plain to project them as plain; nothing was written"
        )


def _redescribed(checkpoint: Checkpoint, container: object, spec: ChipSpec) -> Checkpoint:
    """The output: ``container``, its every description saying ``spec``, which its values are
    projected for, and keeping its layout and hardness (0 for a version 0.2 description, which
    has none), so that a model registered with ``spec`` loads it, and ``--plain`` hardens with it."""
    state_dict = container if checkpoint.under is None else container[checkpoint.under]
    described = {key: encode(saved.layout, spec, saved.hardness or 0.0) for key, _, saved in _descriptions(state_dict)}
    if described:
        state_dict = copy.copy(state_dict)  # keeps the order and _metadata
        state_dict.update(described)
        if checkpoint.under is None:
            container = state_dict
        else:
            container = copy.copy(container)
            container[checkpoint.under] = state_dict
    return dataclasses.replace(checkpoint, container=container, state_dict=state_dict)


def _inner_prefix(checkpoint: Checkpoint, weights: Sequence[Weight], plain: Mapping[str, object], notes: list[str]) -> str:
    """The key prefix of the inner model of a Lightning checkpoint (``net.``) or an AveragedModel
    (``module.``): the first component common to the tracked weights' names; none in a bare
    state_dict, which is its model's own."""
    wrapped = checkpoint.under == "state_dict" or AVERAGED in plain
    firsts = {w.name.partition(".")[0] if "." in w.name else None for w in weights}
    if not wrapped or len(firsts) != 1 or None in firsts:
        return ""
    prefix = f"{firsts.pop()}."
    outside = [key for key in plain if not key.startswith(prefix) and key != AVERAGED]
    if outside:
        raise CliError(
            f"--plain: the tracked weights of {one_line(checkpoint.path)} are all under {one_line(prefix)}, but "
            f"{_listed(outside)} are not: pass --prefix {one_line(prefix)} to write the inner model's keys only, "
            "or --prefix '' to keep every key"
        )
    notes.append(f"--plain: wrote the keys under {prefix} without it, the inner model's (--prefix '' keeps every key)")
    return prefix


def _plain(written: Checkpoint, weights: Sequence[Weight], prefix: str | None, notes: list[str]) -> Checkpoint:
    """The state_dict the plain inner model loads with ``strict=True``, alone: plain keys, each
    tracked weight's effective value (its description's hardness), the keys under ``prefix``
    with it removed (found, if None, by :func:`_inner_prefix`)."""
    try:
        plain = plain_state_dict(written.state_dict)
    except ValueError as error:
        raise CliError(f"--plain: {one_line(error, MESSAGE)}") from None
    if prefix is None:
        prefix = _inner_prefix(written, weights, plain, notes)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    inner = OrderedDict((key[len(prefix):], value) for key, value in plain.items() if key.startswith(prefix))
    if not inner:
        raise CliError(f"--prefix {one_line(prefix)}: no key of {one_line(written.path)} starts with it")
    dropped = [key for key in plain if not key.startswith(prefix)]
    if dropped:
        notes.append(f"--plain: not part of the inner model, not written: {', '.join(dropped)}")
    versions = getattr(written.state_dict, "_metadata", None)
    if versions is not None:  # module versions, which load_state_dict reads, by the inner model's names
        module = prefix.removesuffix(".")  # the inner model itself: "" under its own name
        inner._metadata = OrderedDict(
            (name[len(prefix):], value) for name, value in versions.items() if name == module or name.startswith(prefix)
        )
    return Checkpoint(written.path, inner, inner, None, written.metadata)


def _with_projection(
    checkpoint: Checkpoint, weights: Sequence[Weight], projected: Sequence[Tensor], notes: list[str]
) -> tuple[object, list[Tensor]]:
    """The container holding the projected values, and each weight's new tensor there.

    Memory shared in the input stays shared (tied keys, views), so each key must read back its
    own projection: weights sharing memory whose projections disagree are refused.
    """
    state_dict = checkpoint.state_dict
    targets = [(state_dict[key], p) for w, p in zip(weights, projected) for key in w.keys]
    container, counterpart = files.with_values(checkpoint.container, targets)
    clashing = {files.storage_of(old) for old, p in targets if not torch.equal(counterpart(old), p)}
    if clashing:
        involved = [w.name for w in weights if files.storage_of(w.value) in clashing]
        raise CliError(
            f"{_listed(involved)} share memory, and their projections disagree (each read with its own layout); "
            "pass --model MODULE:FACTORY, or --exclude all but one of them; nothing was written"
        )
    tracked = {key for w in weights for key in w.keys}
    following = [
        key for key, value in state_dict.items()
        if key not in tracked and isinstance(value, Tensor) and not _same_bits(counterpart(value), value)
    ]
    if following:
        notes.append(f"changed with the weights they share memory with: {', '.join(following)}")
    return container, [counterpart(state_dict[w.keys[0]]) for w in weights]


def run_project(args: argparse.Namespace) -> int:
    _check_destinations([("-o", args.output), *_json_destinations(args)], args.checkpoint)
    if args.prefix is not None and not args.plain:
        raise CliError("--prefix says which keys --plain writes: pass --plain too, or leave --prefix out")
    if files.is_safetensors(args.output):
        files.require_safetensors()  # before any work: is the package there?
    checkpoint, spec, weights, notes = gather(args)
    _refuse_unprojectable(weights)
    projected = [functional.project(w.value, w.layout, spec) for w in weights]
    if not args.assume_plain:
        _refuse_guessed(weights, projected)
    container, new_values = _with_projection(checkpoint, weights, projected, notes)
    written = _redescribed(checkpoint, container, spec)
    if args.plain:
        written = _plain(written, weights, args.prefix, notes)
    with files.Outputs() as outputs:
        notes += files.save(outputs, written, args.output)
        before, after = _report(weights, [w.value for w in weights], spec), _report(weights, new_values, spec)
        changes = [_change(w, new) for w, new in zip(weights, new_values)]
        data = {
            "checkpoint": args.checkpoint,
            "output": args.output,
            "plain": args.plain,
            "spec": after.to_dict()["spec"],
            "before": {"mappable": before.is_mappable, "totals": _report_data(before)["totals"]},
            "after": {"mappable": after.is_mappable, "totals": _report_data(after)["totals"]},
            "weights": changes,
            "notes": notes,
        }
        text = "\n".join([_summary("before", before), _summary("after ", after), _change_table(changes)])
        _finish(args, outputs, data, _with_notes(text, notes) + f"\nwrote {one_line(args.output)}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    _check_destinations([(option, path) for option, path in (*_json_destinations(args), ("--plot", args.plot)) if path])
    try:
        from . import demo
    except ImportError as error:
        raise CliError(str(error)) from None
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 100)
    if epochs < 1:
        raise CliError(f"--epochs must be >= 1, got {epochs}")
    try:
        ChipSpec(bits=args.bits, mismatch=args.mismatch)  # checked before training
    except ValueError as error:
        raise CliError(str(error)) from None
    chip = dict(chip=args.chip, bits=args.bits, mismatch=args.mismatch)
    try:
        if args.json != "-":
            return demo.main(epochs, args.json, args.plot, **chip)
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "demo.json")
            with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON alone
                code = demo.main(epochs, path, args.plot, **chip)
            with open(path) as stream:
                print(stream.read().rstrip("\n"))
            return code
    except ImportError as error:
        raise CliError(str(error)) from None


# --- interruptions -----------------------------------------------------------------------------


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while a command runs."""


class _Interruptions:
    """SIGINT and SIGTERM while a command runs raise :class:`Interrupted`, which removes the
    outputs' temporary files on its way out, until :meth:`defer`: once the outputs are being
    renamed into place, the command completes, so that what it prints is what is on disk.

    The signal is remembered: torch's writer turns an exception raised in its stream into a
    RuntimeError of its own, and the command line still says it was interrupted.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.deferred = False

    def _handle(self, number: int, frame: object) -> None:
        if not self.deferred:
            self.received = signal.Signals(number).name
            raise Interrupted(self.received)

    def defer(self) -> None:
        self.deferred = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        self.received, self.deferred = None, False
        if threading.current_thread() is not threading.main_thread():  # only the main thread receives signals
            yield
            return
        previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler if handler is not None else signal.SIG_DFL)


_INTERRUPTIONS = _Interruptions()


# --- the parser --------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A usage error is one line too (the usage itself is one --help away)."""
        self.exit(2, f"{self.prog}: error: {one_line(message, MESSAGE)} (see {self.prog} --help)\n")


def _size(text: str) -> int:
    try:
        size = files.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, got {text!r}")
    return size


def _add_checkpoint_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "checkpoint", metavar="CHECKPOINT",
        help="a state_dict saved with torch.save (or a dict holding one under 'state_dict' or 'model'), "
        "or a *.safetensors file",
    )
    sub.add_argument(
        "--chip", type=str.lower, choices=sorted(CHIPS), help="the chip's preset spec (default: the checkpoint's own, else h1v1)"
    )
    own = "default: the checkpoint's, else"
    sub.add_argument("--limit", type=float, help=f"largest |w| the chip holds ({own} {H1V1.limit})")
    sub.add_argument("--group-size", type=int, help=f"output neurons per block ({own} {H1V1.group_size})")
    sub.add_argument("--bits", type=int, help=f"weights on the symmetric grid of this many bits ({own} none)")
    sub.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave out weights whose dotted name matches (repeatable)"
    )
    sub.add_argument(
        "--model", metavar="MODULE:FACTORY", help="build the model to read exact layouts (grouped or transposed convolutions)"
    )
    sub.add_argument(
        "--assume-plain", action="store_true",
        help="read weights whose layout is guessed as plain: convolutions as ungrouped and not transposed, "
        "2-D *embed* tensors as Linear weights (otherwise excluded); project refuses to change them without it",
    )
    sub.add_argument(
        "--max-bytes", type=_size, default=_size(DEFAULT_MAX_BYTES), metavar="SIZE",
        help="refuse a checkpoint whose loading, or computing with its tensors (an expanded tensor counted in full), "
        f"takes more memory, before it is done (e.g. 500M, 16G; default {DEFAULT_MAX_BYTES})",
    )
    _add_json(sub, "print the result as JSON instead of the text; --json=PATH prints the text and writes the JSON to PATH")


def _add_json(sub: argparse.ArgumentParser, help: str) -> None:
    sub.add_argument("--json", nargs="?", const="-", metavar="PATH", help=help)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nwave-param", description="Check and fit models for the Neuronova chip.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, allow_abbrev=False)
        sub.set_defaults(run=run)
        return sub

    check = add("check", "print the per-weight report of a checkpoint; exit 0 when mappable, 1 when not", run_check)
    _add_checkpoint_options(check)
    project = add("project", "write the L1-nearest mappable checkpoint", run_project)
    _add_checkpoint_options(project)
    project.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="where to write (never the input); *.safetensors writes safetensors"
    )
    project.add_argument(
        "--plain", action="store_true",
        help="write only the state_dict the plain model (without nwave_param) loads with strict=True: of a Lightning "
        "checkpoint or an AveragedModel, the inner model's",
    )
    project.add_argument(
        "--prefix", metavar="PREFIX",
        help="with --plain: write the keys under PREFIX (e.g. net.), without it; --prefix '' keeps every key "
        "(default: the tracked weights' common first component, in a Lightning checkpoint or an AveragedModel)",
    )
    demo = add("demo", "train a spiking network on handwritten digits with and without the penalties", run_demo)
    demo.add_argument("--quick", action="store_true", help="a few epochs (a smoke run)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 100, --quick 3)")
    demo.add_argument("--plot", metavar="PATH", help="write a PNG: weight histograms and per-layer violations")
    demo.add_argument(
        "--chip", type=str.lower, choices=sorted(CHIPS), default="h1v2",
        help="the chip the network is built for and trained against (default h1v2, the evaluation kit's)",
    )
    demo.add_argument("--bits", type=int, default=None, metavar="B", help="train and evaluate on a B-bit weight grid")
    demo.add_argument("--mismatch", type=float, default=0.0, metavar="S", help="device mismatch: std of the noise on each weight (default 0)")
    _add_json(
        demo,
        "print the numbers as JSON instead of the table (which goes to stderr); "
        "--json=PATH (or --json PATH) writes them to PATH",
    )
    return parser


def _attach_json_paths(argv: list[str]) -> list[str]:
    """In check and project, a bare ``--json`` never takes the next word as its path: only
    ``--json=PATH`` carries one (otherwise ``check --json model.pt`` would lose its checkpoint).
    ``demo`` takes no file, so ``--json PATH`` keeps working there."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in ("check", "project"):
        return argv
    end = argv.index("--") if "--" in argv else len(argv)
    return ["--json=-" if a == "--json" else a for a in argv[:end]] + argv[end:]


def _fail(message: str) -> int:
    print(f"nwave-param: error: {one_line(message, MESSAGE)}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, unknown = parser.parse_known_args(_attach_json_paths(argv))
    if unknown:
        after_json = {word for flag, word in zip(argv, argv[1:]) if flag == "--json"}
        hint = "; attach a path to --json with '=': --json=PATH" if after_json & set(unknown) else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        with _INTERRUPTIONS.installed():
            return args.run(args)
    except CliError as error:
        message = str(error)
    except KeyboardInterrupt:
        message = "interrupted"
    except MemoryError:
        message = "out of memory; a smaller --max-bytes refuses such checkpoints before loading them"
    except Exception as error:  # every error is one line: even one nobody foresaw
        message = f"unexpected {type(error).__name__}: {one_line(error)} (please report it with the command line)"
    if _INTERRUPTIONS.received:  # whatever the signal became on its way out (torch's writer rewraps it)
        message = f"interrupted by {_INTERRUPTIONS.received}" + ("" if args.command == "demo" else ": nothing was written")
    return _fail(message)


if __name__ == "__main__":
    sys.exit(main())
