"""The commands of the ``nwave-param`` command line (:mod:`nwave_param.checkpoints.cli`, which runs them with
its signal handling installed first): the parser, ``check``, ``project`` and ``demo``, a shell over
:mod:`nwave_param.checkpoints.offline` and the demo.

``--json`` prints strict JSON on stdout instead of the text (a number that is not finite is
``null``, and ``"not_finite"`` beside it says what it was); ``--json=PATH`` prints the text and
also writes the JSON to PATH.  The path is attached with ``=``, as GNU tools take an optional
argument, so ``check --json model.pt`` never takes the checkpoint for the JSON file.  Which
weights, and their layouts: :mod:`nwave_param.checkpoints.offline`; reading and writing files:
:mod:`nwave_param.checkpoints.files`; signals and ``--model``: :mod:`nwave_param.checkpoints.guards`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence

from nwave_param import __version__
from nwave_param.checkpoints import files, offline
from nwave_param.checkpoints.guards import INTERRUPTIONS, build_model, stdout_to_devnull, users_code
from nwave_param.checkpoints.outputs import Outputs, check_destinations
from nwave_param.core.report import Report, aligned
from nwave_param.errors import MESSAGE, CheckpointError, noticed, one_line
from nwave_param.spec import H1V1, H1V2, ChipSpec

__all__ = ["run"]

CHIPS = {"h1v1": H1V1, "h1v2": H1V2}
SPEC_OPTIONS = {"limit": "--limit", "group_size": "--group-size", "bits": "--bits"}  # ChipSpec field -> option
DEFAULT_MAX_BYTES = "4G"


def _arguments(args: argparse.Namespace) -> tuple[files.Checkpoint, ChipSpec | None, dict]:
    """Check the options, load the checkpoint and build ``--model`` (guarded): the arguments of
    :func:`~nwave_param.check_state_dict` and :func:`~nwave_param.project_state_dict`."""
    overrides = {field: getattr(args, field) for field in SPEC_OPTIONS if getattr(args, field) is not None}
    for field, value in overrides.items():
        try:
            ChipSpec(**{field: value})
        except ValueError as error:
            raise CheckpointError(f"{SPEC_OPTIONS[field]} {value}: {str(error).removeprefix('ChipSpec: ')}") from None
    checkpoint = files.load(args.checkpoint, args.max_bytes)
    spec = CHIPS[args.chip] if args.chip else None
    if overrides:
        spec = dataclasses.replace(spec or offline.saved_spec(checkpoint) or ChipSpec(), **overrides)
    options = dict(exclude=args.exclude, assume_plain=args.assume_plain)
    if args.model:
        with _users_model(args):
            options["model"] = build_model(args.model)
    return checkpoint, spec, options


def _users_model(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The guard on the user's code (``--model``'s factory, and its model's hooks when a checkpoint is loaded into it)."""
    return users_code(f"--model {one_line(args.model)}") if args.model else contextlib.nullcontext()


# --- output ------------------------------------------------------------------------------------


def _report_data(report: Report) -> dict:
    """``report.to_dict()`` with its floats as computed, so that :func:`_strict` says what one that is
    not finite was (``to_dict`` makes it None, without a word)."""
    data = report.to_dict()
    for entry, row in zip(data["rows"], report.rows):
        entry.update({key: getattr(row, key) for key in ("max_abs", "magnitude", "topology")})
    data["totals"] = report.totals
    return data


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


def _finish(args: argparse.Namespace, outputs: Outputs, data: Callable[[], dict], text: Callable[[], str]) -> None:
    """Add the JSON file to the outputs (``--json=PATH``), rename every output into place, then
    print the JSON (``--json``) or the text.  Each is made only if it is printed or written: for
    many weights, either takes as long as checking them."""
    rendered = json.dumps(_strict(data()), indent=2, allow_nan=False) if args.json is not None else None
    if args.json not in (None, "-"):
        outputs.add_text(args.json, rendered + "\n")
    printed = rendered if args.json == "-" else text()
    INTERRUPTIONS.complete_from_here()  # a signal some library swallowed still stops it; else what it prints is what is on disk
    outputs.commit()
    _print(printed)


def _print(text: str) -> None:
    """Print the result.  A closed stdout (``nwave-param check model.pt | head -n 1``) is a reader
    that wanted no more, not an error: the rest goes to /dev/null, as the Python documentation's
    note on SIGPIPE does it, and the exit status stays the verdict."""
    try:
        print(text, flush=True)  # flushed here: at exit, the error would escape every handler
    except BrokenPipeError:
        stdout_to_devnull()


def _with_notes(text: str, notes: Sequence[str]) -> str:
    return "\n".join([text, *(f"note: {one_line(note, MESSAGE)}" for note in notes)])


def _json_destinations(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("--json", args.json)] if args.json not in (None, "-") else []


def run_check(args: argparse.Namespace) -> int:
    check_destinations(_json_destinations(args), args.checkpoint)
    checkpoint, spec, options = _arguments(args)
    notes: list[str] = []
    with _users_model(args), noticed(notes):
        report = offline.check_state_dict(checkpoint, spec, **options)
    with Outputs() as outputs:
        _finish(
            args, outputs, lambda: {"checkpoint": args.checkpoint, **_report_data(report), "notes": notes},
            lambda: _with_notes(str(report), notes),
        )
    _note_the_default_chip(args, checkpoint, "checked against")
    return 0 if report.is_mappable else 1


def _note_the_default_chip(args: argparse.Namespace, checkpoint: files.Checkpoint, done: str) -> None:
    """Say on stderr which chip a file that does not say its own was held to, and how to choose
    another: once the command has succeeded (an error is one line), and never on stdout (--json)."""
    if args.chip is None and not any(getattr(args, field) is not None for field in SPEC_OPTIONS) and offline.saved_spec(checkpoint) is None:
        print(
            f"nwave-param: note: {one_line(args.checkpoint)} does not say which chip it was trained for (a plain state_dict), "
            f"so it was {done} the H1v1 chip (limit {H1V1.limit}, blocks of {H1V1.group_size}); "
            "for the H1v2, pass --chip h1v2 (or --limit, --group-size, --bits)",
            file=sys.stderr,
        )


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


def run_project(args: argparse.Namespace) -> int:
    check_destinations([("-o", args.output), *_json_destinations(args)], args.checkpoint)
    if args.prefix is not None and not args.plain:
        raise CheckpointError("--prefix says which keys --plain writes: pass --plain too, or leave --prefix out")
    if files.is_safetensors(args.output):
        files.require_safetensors()  # before any work: is the package there?
    checkpoint, spec, options = _arguments(args)
    notes: list[str] = []
    with _users_model(args), noticed(notes):
        before = offline.check_state_dict(checkpoint, spec, **options)
        try:
            written, changes = offline.project_state_dict(checkpoint, spec, **options)
        except CheckpointError as error:
            raise CheckpointError(f"{error}; nothing was written") from None
    with _users_model(args), noticed([]):  # the notes are the same
        after = offline.check_state_dict(written, before.spec, **options)
    if args.plain:
        written = offline.plain_checkpoint(written, [change["name"] for change in changes], args.prefix, notes)
    with Outputs() as outputs:
        notes += files.save(outputs, written, args.output)
        data = lambda: {  # noqa: E731
            "checkpoint": args.checkpoint,
            "output": args.output,
            "plain": args.plain,
            "spec": after.spec_data(),
            "before": {"mappable": before.is_mappable, "totals": before.totals},
            "after": {"mappable": after.is_mappable, "totals": after.totals},
            "weights": changes,
            "notes": notes,
        }
        text = lambda: "\n".join([_summary("before", before), _summary("after ", after), _change_table(changes)])  # noqa: E731
        _finish(args, outputs, data, lambda: _with_notes(text(), notes) + f"\nwrote {one_line(args.output)}")
    _note_the_default_chip(args, checkpoint, "projected for")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    check_destinations([(option, path) for option, path in (*_json_destinations(args), ("--plot", args.plot)) if path])
    epochs = args.epochs if args.epochs is not None else (3 if args.quick else None)  # None: the task's own
    if epochs is not None and epochs < 1:
        raise CheckpointError(f"--epochs must be >= 1, got {epochs}")
    if not 0 <= args.seed < 2**64:  # torch's generators take 64 bits
        raise CheckpointError(f"--seed must be in [0, 2**64), got {args.seed}")
    try:
        ChipSpec(bits=args.bits, mismatch=args.mismatch)  # checked before training
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    try:
        with INTERRUPTIONS.held():  # its libraries import as torch does: a signal stops the command right after
            from nwave_param import demo

            demo.import_libraries(args.task, args.plot is not None)
    except ImportError as error:
        raise CheckpointError(str(error)) from None
    try:
        return demo.main(
            epochs, args.json, args.plot, chip=args.chip, bits=args.bits, mismatch=args.mismatch, task=args.task, seed=args.seed
        )
    except ImportError as error:
        raise CheckpointError(str(error)) from None


# --- the parser ---------------------------------------------------------------------------------


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
        help="refuse a checkpoint whose loading, or whose tensors (an expanded tensor counted in full), take more memory, "
        f"before loading; checking and projecting take a few times the tensors' size more (e.g. 500M, 16G; default {DEFAULT_MAX_BYTES})",
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
    demo = add(
        "demo", "train a spiking network for the chip three ways (spoken vowels or handwritten digits), then put it on the chip", run_demo
    )
    demo.add_argument(
        "--task", choices=("digits", "vowels"), default="digits",
        help="handwritten digits (the default: the three runs in under 2 minutes) or spoken Japanese vowels",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="the initialization and batch order (the data split stays fixed; default 0)"
    )
    demo.add_argument("--quick", action="store_true", help="a few epochs (a smoke run)")
    demo.add_argument(
        "--epochs", type=int, default=None, help="training epochs per run (default the task's: vowels 60, digits 100; --quick 3)"
    )
    demo.add_argument(
        "--plot", metavar="PATH",
        help="write a PNG: the accuracies, the per-layer violations, the placement and the weight histograms",
    )
    demo.add_argument(
        "--chip", type=str.lower, choices=sorted(CHIPS), default="h1v2",
        help="the chip the network is built for and trained against (default h1v2, the evaluation kit's)",
    )
    demo.add_argument("--bits", type=int, default=None, metavar="B", help="train and evaluate on a B-bit weight grid")
    demo.add_argument(
        "--mismatch", type=float, default=0.0, metavar="S", help="device mismatch: std of the noise on each weight (default 0)"
    )
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
    command = next((word for word in argv if not word.startswith("-")), None)  # its first word that is not an option
    if command not in ("check", "project"):
        return argv
    end = argv.index("--") if "--" in argv else len(argv)
    return ["--json=-" if a == "--json" else a for a in argv[:end]] + argv[end:]


def run(argv: list[str]) -> int:
    """Parse ``argv`` and run its command: its exit status, or its refusal raised (a
    :class:`~nwave_param.errors.CheckpointError`); a usage error exits (``SystemExit(2)``)."""
    parser = _parser()
    try:
        args, unknown = parser.parse_known_args(_attach_json_paths(argv))
    except BrokenPipeError:  # --help or --version into a closed stdout: a reader that wanted no more
        stdout_to_devnull()
        return 0
    if unknown:
        after_json = {word for flag, word in zip(argv, argv[1:]) if flag == "--json"}
        hint = "; attach a path to --json with '=': --json=PATH" if after_json & set(unknown) else ""
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    return args.run(args)
