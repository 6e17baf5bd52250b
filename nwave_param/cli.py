"""The ``nwave-param`` command line: check and project checkpoints.

::

    nwave-param check CHECKPOINT [--limit 0.9] [--group-size 5] [--exclude GLOB ...] [--model MODULE:FACTORY] [--json]
    nwave-param project CHECKPOINT -o OUT [same options]

Exit status: 0 mappable (check) or written (project); 1 not mappable; 2 bad usage, an
unreadable file or a checkpoint that cannot be projected, with a one-line error.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import functional
from .layout import Layout
from .discovery import is_weight_name as _is_weight_name
from .registry import register
from .report import Report, build_report
from .spec import ChipSpec

__all__ = ["main"]


class CliError(Exception):
    """A one-line error for the user; exit status 2."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: the object on disk and the state_dict inside it (``under`` its key)."""

    container: object
    state_dict: Mapping[str, Tensor]
    under: str | None


@dataclass
class Weight:
    """A tracked weight of a checkpoint: its name, the key holding it, its value and layout."""

    name: str
    key: str | None  # None: stored through other parametrizations (only with --model)
    value: Tensor
    layout: Layout
    aliases: tuple[str, ...] = ()  # other keys of the same (tied) parameter


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, Tensor) for v in obj.values())
    )


def load_checkpoint(path: str) -> Checkpoint:
    """Load ``path`` with ``weights_only=True`` and find its state_dict."""
    if not os.path.isfile(path):
        raise CliError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a bad file
        if "Weights only load failed" in str(error):
            raise CliError(
                f"{path} holds pickled Python objects (a full model?), which could run code when loaded; "
                "save model.state_dict() instead"
            ) from None
        reason = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        raise CliError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and _is_state_dict(obj.get(key)):
            return Checkpoint(obj, obj[key], key)
    if _is_state_dict(obj):
        return Checkpoint(obj, obj, None)
    raise CliError(f"{path} holds no state_dict (expected one, or a dict with it under 'state_dict' or 'model')")


_REGISTERED = re.compile(r"^(?:(?P<path>.*)\.)?parametrizations\.(?P<tensor>[^.]+)\.(?P<original>original\d*)$")
_RNN = re.compile(r"^weight_(?:ih|hh)(?P<suffix>_l\d+(?:_reverse)?)?$")


def _gates(name: str, weights: Mapping[str, Tensor]) -> int:
    """Gate count of an RNN-family ``weight_ih*``/``weight_hh*``, from the ``weight_hh`` shapes."""
    path, _, local = name.rpartition(".")
    prefix = f"{path}." if path else ""
    suffix = _RNN.match(local).group("suffix") or ""
    hh = weights.get(f"{prefix}weight_hh{suffix}")
    if hh is None or hh.dim() != 2:
        raise CliError(f"cannot tell the gates of {name}: no 2-d {prefix}weight_hh{suffix} beside it")
    hr = weights.get(f"{prefix}weight_hr{suffix}")
    hidden = hr.shape[1] if hr is not None and hr.dim() == 2 else hh.shape[1]
    gates, rest = divmod(hh.shape[0], hidden) if hidden else (0, 1)
    if rest or gates not in (1, 3, 4):
        raise CliError(
            f"{name}: {prefix}weight_hh{suffix} of shape {tuple(hh.shape)} fits no RNN, GRU or LSTM layout"
        )
    return gates


def infer_weights(state_dict: Mapping[str, Tensor], exclude: Sequence[str], notes: list[str]) -> list[Weight]:
    """The tracked weights of a bare state_dict, layouts inferred from names and shapes."""
    effective: dict[str, tuple[str, Tensor]] = {}
    chained = set()
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        match = _REGISTERED.match(key)
        if match is None:
            effective.setdefault(key, (key, value))
            continue
        name = ".".join(filter(None, (match["path"], match["tensor"])))
        if match["original"] == "original":
            effective[name] = (key, value)
        else:
            chained.add(name)
    if chained:
        notes.append(
            f"skipped {', '.join(sorted(chained))}: stored through other parametrizations; pass --model to read them"
        )
    unmatched = [p for p in exclude if not any(fnmatch.fnmatchcase(name, p) for name in effective)]
    if unmatched:
        notes.append(f"--exclude {' '.join(unmatched)} matched no weight")
    values = {name: value for name, (_, value) in effective.items()}
    tracked, plain_convs = [], []
    for name, (key, value) in effective.items():
        local = name.rpartition(".")[2]
        if not (_is_weight_name(local) and value.dim() >= 2 and value.dtype.is_floating_point):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            continue
        layout = Layout(gates=_gates(name, values)) if _RNN.match(local) else Layout()
        if value.dim() > 2:
            plain_convs.append(name)
        layout.check(value.shape, name)
        tracked.append(Weight(name, key, value, layout))
    if plain_convs:
        notes.append(
            f"read as plain convolutions (dim 0 = output channel, groups=1): {', '.join(plain_convs)}; "
            "ConvTranspose and grouped convolutions look the same in a state_dict, pass --model for them"
        )
    return tracked


def _build_model(factory_path: str) -> nn.Module:
    module_name, _, attribute = factory_path.partition(":")
    if not module_name or not attribute:
        raise CliError(f"--model takes MODULE:FACTORY (e.g. mypkg.models:make_net), got {factory_path!r}")
    sys.path.insert(0, os.getcwd())  # a console script does not see the working directory
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
        model = factory()
    except Exception as error:  # the user's code: report it on one line
        raise CliError(f"--model {factory_path}: {type(error).__name__}: {error}") from None
    finally:
        sys.path.remove(os.getcwd())
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {factory_path} returned {type(model).__name__}, not an nn.Module")
    return model


def model_weights(factory_path: str, state_dict: Mapping[str, Tensor], spec: ChipSpec, exclude: Sequence[str]) -> list[Weight]:
    """The tracked weights with the exact layouts of the model ``factory_path`` builds."""
    model = _build_model(factory_path)
    try:
        reg = register(model, spec, exclude=exclude)
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError) as error:
        raise CliError(f"--model {factory_path}: {str(error).strip().splitlines()[0]}") from None
    held = model.state_dict(keep_vars=True)
    weights = []
    for name, value, layout in zip(reg.names, reg.weights(), reg._layouts):
        path, _, local = name.rpartition(".")
        registered = ".".join(filter(None, (path, f"parametrizations.{local}.original")))
        key = next((k for k in (name, registered) if k in state_dict), None)
        aliases = tuple(k for k, t in held.items() if t is value and k != key and k in state_dict)
        # the model gives the layout; the values stay the checkpoint's own, in its own dtype
        stored = state_dict[key] if key is not None else value.detach()
        weights.append(Weight(name, key, stored, layout, aliases))
    return weights


def _weights(args: argparse.Namespace, checkpoint: Checkpoint, spec: ChipSpec, notes: list[str]) -> list[Weight]:
    if args.model:
        weights = model_weights(args.model, checkpoint.state_dict, spec, args.exclude)
    else:
        try:
            weights = infer_weights(checkpoint.state_dict, args.exclude, notes)
        except ValueError as error:
            raise CliError(f"{args.checkpoint}: {error}") from None
    if not weights:
        raise CliError(
            f"{args.checkpoint}: no trackable weight among its {len(checkpoint.state_dict)} keys "
            "(parameters of 2+ dims named 'weight', 'weight_*', '*_weight' or '*_weights')"
        )
    return weights


def _report(weights: Sequence[Weight], spec: ChipSpec) -> Report:
    return build_report([w.name for w in weights], [w.value for w in weights], [w.layout for w in weights], spec, 2)


def _spec(args: argparse.Namespace) -> ChipSpec:
    try:
        return ChipSpec(limit=args.limit, group_size=args.group_size)
    except ValueError as error:
        raise CliError(str(error)) from None


def run_check(args: argparse.Namespace) -> int:
    spec = _spec(args)
    notes: list[str] = []
    report = _report(_weights(args, load_checkpoint(args.checkpoint), spec, notes), spec)
    if args.json:
        print(json.dumps({**report.to_dict(), "notes": notes}, indent=2))
    else:
        print(report)
        for note in notes:
            print(f"note: {note}")
    return 0 if report.is_mappable else 1


def _save(obj: object, output: str) -> None:
    """Write atomically: a crash never leaves a half-written OUT."""
    directory = os.path.dirname(os.path.abspath(output))
    try:
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=".nwave-param-", suffix=".tmp")
    except OSError as error:
        raise CliError(f"cannot write {output}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
        os.replace(temporary, output)
    except OSError as error:
        os.unlink(temporary)
        raise CliError(f"cannot write {output}: {error.strerror or error}") from None


def _summary(label: str, report: Report) -> str:
    totals = report.totals
    return (
        f"{label}: max |w| {totals['max_abs']:.4g}, {totals['out_of_range']} of {totals['numel']} weights "
        f"out of range, {totals['mixed_block_columns']} of {totals['block_columns']} block columns mixed, "
        f"{'mappable' if report.is_mappable else 'NOT mappable'}"
    )


def run_project(args: argparse.Namespace) -> int:
    spec = _spec(args)
    checkpoint = load_checkpoint(args.checkpoint)
    if os.path.exists(args.output) and os.path.samefile(args.output, args.checkpoint):
        raise CliError(f"refusing to overwrite the input {args.checkpoint}: choose another -o")
    notes: list[str] = []
    weights = _weights(args, checkpoint, spec, notes)
    for weight in weights:
        if not bool(torch.isfinite(weight.value).all()):
            raise CliError(f"{weight.name} holds NaN or infinite values: nothing was written")
        if weight.key is None:
            raise CliError(f"{weight.name} is stored through other parametrizations; project the model in Python")
    before = _report(weights, spec)
    projected = [
        Weight(w.name, w.key, functional.chip(w.value, w.layout, spec), w.layout, w.aliases)
        for w in weights
    ]
    state_dict = copy.copy(checkpoint.state_dict)  # keeps the key order and every other tensor
    for weight in projected:
        for key in (weight.key, *weight.aliases):
            state_dict[key] = weight.value
    container = state_dict
    if checkpoint.under is not None:
        container = copy.copy(checkpoint.container)
        container[checkpoint.under] = state_dict
    _save(container, args.output)
    print(_summary("before", before))
    print(_summary("after ", _report(projected, spec)))
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {args.output}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    try:
        from . import demo
    except ImportError as error:
        raise CliError(str(error)) from None
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else 100)
    if epochs < 1:
        raise CliError(f"--epochs must be >= 1, got {epochs}")
    try:
        return demo.main(epochs, args.json, args.plot)
    except ImportError as error:
        raise CliError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nwave-param", description="Check and fit models for the Neuronova chip.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        return sub

    check = add("check", "print the per-weight report of a checkpoint; exit 0 when mappable, 1 when not", run_check)
    project = add("project", "write the L1-nearest mappable checkpoint", run_project)
    project.add_argument("-o", "--output", required=True, metavar="OUT", help="where to write (never the input)")
    for sub in (check, project):
        sub.add_argument("checkpoint", metavar="CHECKPOINT", help="a state_dict saved with torch.save, or a dict holding one under 'state_dict' or 'model'")
        sub.add_argument("--limit", type=float, default=ChipSpec.limit, help="largest |w| the chip holds (default %(default)s)")
        sub.add_argument("--group-size", type=int, default=ChipSpec.group_size, help="output neurons per block (default %(default)s)")
        sub.add_argument("--exclude", nargs="+", action="extend", default=[], metavar="GLOB", help="weights that run off-chip, by dotted name")
        sub.add_argument("--model", metavar="MODULE:FACTORY", help="build the model to read exact layouts (ConvTranspose, groups)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    demo = add("demo", "train a spiking network on handwritten digits with and without the penalties", run_demo)
    demo.add_argument("--quick", action="store_true", help="a few epochs (a smoke run)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 100, --quick 3)")
    demo.add_argument("--json", metavar="PATH", help="write the numbers as JSON")
    demo.add_argument("--plot", metavar="PATH", help="write a PNG: weight histograms and per-layer violations")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as error:
        print(f"nwave-param: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
