"""The ``nwave-param`` command line: a shell over :mod:`nwave_param.checkpoints.offline` and the demo.

::

    nwave-param check CHECKPOINT [options]             # the report; exit 0 mappable, 1 not mappable
    nwave-param project CHECKPOINT -o OUT [options]    # write the L1-nearest mappable checkpoint
    nwave-param demo [--task digits|vowels] [--seed N] [--chip h1v1|h1v2] [--bits B] [--mismatch S]
                     [--quick] [--epochs N] [--json[=PATH]] [--plot PATH]

Every error is one line on stderr and exit status 2; exit 1 means only "not mappable" (check).
What comes from a file or from user code (names, paths, messages) is escaped and cut to fit that
line, in the text output too.  A closed stdout (``| head``) changes no exit status.

The handling of SIGINT and SIGTERM is the first thing :func:`main` does, before torch is
imported: ``import nwave_param`` imports nothing, and this module only :mod:`nwave_param.checkpoints.guards`,
which imports nothing heavy (nor does :mod:`nwave_param.errors`, imported next), so an interrupt at
any moment from there on, while torch is still importing too, ends in one line and exit status 2,
with nothing written.
The commands themselves: :mod:`nwave_param.checkpoints.commands`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from nwave_param.checkpoints.guards import INTERRUPTIONS, stdout_to_devnull

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` and return its exit status.  Without ``argv`` it is the
    program itself (``sys.argv[1:]``), which exits next: once the command has ended, SIGINT and
    SIGTERM are ignored until then (:meth:`~nwave_param.checkpoints.guards.Interruptions.installed`).

    Args:
        argv: the arguments, without the program's name (``["check", "model.pt", "--json"]``);
            None: ``sys.argv[1:]``, the program's own run.

    Returns:
        The exit status: 0 done (``check``: mappable), 1 not mappable (``check`` only), 2 an
        error, printed as one line on stderr.  Every error of a command, an interrupt included,
        is an exit status, not an exception.

    Raises:
        SystemExit: argparse's, for a usage error (status 2, its message on stderr) and for
            ``--help`` and ``--version`` (status 0).
    """
    try:
        with INTERRUPTIONS.installed(restore=argv is not None):  # first: before torch is imported
            return _run(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # in the instant the handler was being installed, or errors imported: nothing has run
        print(f"nwave-param: error: interrupted by {INTERRUPTIONS.received or 'SIGINT'}: nothing was written", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    """The command's exit status; every error as one line on stderr, exit status 2."""
    from nwave_param.errors import MESSAGE, CheckpointError, one_line

    try:
        with INTERRUPTIONS.held():  # torch and the rest, imported with the handler in place; a signal stops the command after
            from nwave_param.checkpoints import commands

        return commands.run(argv)
    except CheckpointError as error:
        message = str(error)
    except KeyboardInterrupt:
        message = "interrupted"
    except MemoryError:
        message = "out of memory; a smaller --max-bytes refuses such checkpoints before loading them"
    except BrokenPipeError:  # stdout closed while the command was still printing (the demo's tables)
        stdout_to_devnull()
        message = "stdout was closed before the command finished printing"
    except Exception as error:  # every error is one line: even one nobody foresaw
        message = f"unexpected {type(error).__name__}: {one_line(error)} (please report it with the command line)"
    INTERRUPTIONS.defer()  # the command has ended: a second signal must not cut its message short
    if INTERRUPTIONS.received:  # whatever the signal became on its way out (torch's writer rewraps it)
        message = f"interrupted by {INTERRUPTIONS.received}: nothing was written"  # every command writes all or none
    print(f"nwave-param: error: {one_line(message, MESSAGE)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
