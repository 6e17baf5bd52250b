"""The command line's guards on its process: signals, stdout, and the user's code it runs.

Imported before torch (by :mod:`nwave_param.checkpoints.cli`), it imports nothing heavy itself.

* SIGINT and SIGTERM while a command runs raise :class:`Interrupted`, which removes the outputs'
  temporary files on its way out, until the outputs are being renamed into place
  (:meth:`Interruptions.defer`); the command then completes, so that what it prints is on disk.
* ``--model MODULE:FACTORY`` runs guarded (:func:`users_code`): its prints go to stderr (stdout
  carries ``--json`` alone), the working directory and ``sys.path`` are restored after it, and its
  ``sys.exit`` or exception becomes a one-line :class:`~nwave_param.errors.CheckpointError`.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator

TYPE_CHECKING = False  # typing's, without importing typing: this module is imported before the signal handler is installed
if TYPE_CHECKING:
    from torch import nn

__all__ = ["INTERRUPTIONS", "Interrupted", "build_model", "stdout_to_devnull", "users_code"]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while a command runs."""


class Interruptions:
    """SIGINT and SIGTERM while a command runs raise :class:`Interrupted`, which removes the
    outputs' temporary files on its way out, until :meth:`defer`: once the outputs are being
    renamed into place, the command completes, so that what it prints is what is on disk.

    The signal is remembered: torch's writer turns an exception raised in its stream into a
    RuntimeError of its own, and the command line still says it was interrupted; one raised where
    Python cannot raise it (a weakref callback during an import) is not printed, and :meth:`check`
    stops the command with it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.deferred = False
        self._previous_unraisable = sys.__unraisablehook__

    def _handle(self, number: int, frame: object) -> None:
        if not self.deferred:
            self.received = signal.Signals(number).name
            raise Interrupted(self.received)

    def defer(self) -> None:
        self.deferred = True

    def _unraisable(self, report: object) -> None:
        """``sys.unraisablehook`` while installed: an :class:`Interrupted` raised where Python cannot
        raise it (a weakref callback in importlib's module locks during an import, a ``__del__``) is
        remembered in ``received``, and :meth:`check` raises it at the command's next step: it is not
        printed as an ignored exception.  Anything else goes to the hook that was in place."""
        if not isinstance(getattr(report, "exc_value", None), Interrupted):
            self._previous_unraisable(report)

    @contextlib.contextmanager
    def installed(self, restore: bool = True) -> Iterator[None]:
        """Handle SIGINT and SIGTERM inside; after, the caller's handlers again, or with
        ``restore=False`` (the program's own run, which exits next) both signals ignored: the
        interpreter's teardown (a third of a second once torch is loaded) puts back the default
        handlers of the signals Python handles, which would kill a command that has completed,
        with no word and the signal's exit status; an ignored one it leaves ignored.  (Blocking
        them would not do: torch's threads would take the signal.)"""
        self.received, self.deferred = None, False
        try:
            previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
        except ValueError:  # not the main thread, which alone receives signals
            yield
            return
        self._previous_unraisable, sys.unraisablehook = sys.unraisablehook, self._unraisable
        try:
            yield
        finally:
            self.defer()  # the command has ended: a signal from here on ends nothing half-way
            sys.unraisablehook = self._previous_unraisable
            if restore:
                for number, handler in previous.items():
                    signal.signal(number, handler if handler is not None else signal.SIG_DFL)
            else:
                for number in previous:
                    signal.signal(number, signal.SIG_IGN)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came and was swallowed on its way (an import that
        catches every exception): the command stops as it would have."""
        if self.received and not self.deferred:
            raise Interrupted(self.received)


INTERRUPTIONS = Interruptions()


def stdout_to_devnull() -> None:
    """What is still buffered for stdout, and all that follows, goes to /dev/null: after a closed
    stdout (``| head``), as the Python documentation's note on SIGPIPE does it (Python flushes
    stdout at exit, and a second broken pipe there would escape every handler)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


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
def users_code(what: str) -> Iterator[None]:
    """Run the user's code (``--model``'s module, its factory, its model's hooks) as a guarded call.

    What it prints goes to stderr; the working directory and ``sys.path`` are restored after it;
    its ``sys.exit`` and its exceptions become a one-line error naming ``what``.
    """
    from nwave_param.errors import (  # here, not above: this module is imported before the signal handler is installed
        CheckpointError,
        one_line,
    )

    directory, path = os.getcwd(), list(sys.path)
    try:
        with _stdout_to_stderr():
            yield
    except CheckpointError:
        raise
    except SystemExit as exit:
        raise CheckpointError(f"{what} called sys.exit({one_line(repr(exit.code))}) instead of returning the model") from None
    except Exception as error:  # the user's code: report it on one line
        raise CheckpointError(f"{what}: {type(error).__name__}: {one_line(error)}") from None
    finally:
        sys.path[:] = path
        try:
            os.chdir(directory)
        except OSError as error:
            raise CheckpointError(
                f"{what} left the working directory {one_line(directory)}, which cannot be entered again: {error.strerror}"
            ) from None


def build_model(factory_path: str) -> nn.Module:
    from torch import nn  # here, not above: this module is imported before torch (see nwave_param.checkpoints.cli)

    from nwave_param.errors import CheckpointError, one_line

    module_name, _, attribute = factory_path.partition(":")
    if not module_name or not attribute:
        raise CheckpointError(f"--model takes MODULE:FACTORY (e.g. mypkg.models:make_net), got {one_line(repr(factory_path))}")
    sys.path.insert(0, os.getcwd())  # a console script does not see the working directory; users_code takes it out
    model = getattr(importlib.import_module(module_name), attribute)()
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--model {one_line(factory_path)} returned {type(model).__name__}, not an nn.Module")
    return model
