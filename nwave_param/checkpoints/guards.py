"""The command line's guards on its process: signals, stdout, and the user's code it runs.

Imported before torch (by :mod:`nwave_param.checkpoints.cli`), it imports nothing heavy itself.

* SIGINT and SIGTERM while a command runs raise :class:`Interrupted`, which removes the outputs'
  temporary files on its way out, until the outputs are being renamed into place
  (:meth:`Interruptions.complete_from_here`); the command then completes, so that what it prints
  is on disk.  While torch imports, a signal is held and raised after (:meth:`Interruptions.held`).
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
import threading
from collections.abc import Iterator

TYPE_CHECKING = False  # typing's, without importing typing: this module is imported before the signal handler is installed
if TYPE_CHECKING:
    from torch import nn

__all__ = ["INTERRUPTIONS", "Interrupted", "build_model", "stdout_to_devnull", "users_code"]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM while a command runs."""


class Interruptions:
    """SIGINT and SIGTERM while a command runs raise :class:`Interrupted`, which removes the
    outputs' temporary files on its way out, until :meth:`complete_from_here`: once the outputs are
    being renamed into place, the command completes, so that what it prints is what is on disk.

    The signal is remembered: torch's writer turns an exception raised in its stream into a
    RuntimeError of its own, and the command line still says it was interrupted.  Where raising it
    would do harm it is only remembered, and :meth:`check` raises it after: while torch imports
    (:meth:`held`), and where Python cannot raise it (a weakref callback, a ``__del__``: Python hands
    it to ``sys.unraisablehook``, which would print it as an ignored exception).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: str | None = None
        self.deferred = False
        self.holding = False

    def _handle(self, number: int, frame: object) -> None:
        if not self.deferred:
            self.received = signal.Signals(number).name
            if not self.holding:
                raise Interrupted(self.received)

    def defer(self) -> None:
        self.deferred = True

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal came and was held or swallowed on its way (an
        import that catches every exception): the command stops as it would have."""
        if self.received and not self.deferred:
            raise Interrupted(self.received)

    def complete_from_here(self) -> None:
        """Stop now if a signal came (:meth:`check`), else let the command complete: called before
        its outputs are renamed into place, so that what it prints is what is on disk."""
        self.check()
        self.defer()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A signal inside is remembered, not raised, and raised on leaving: for importing torch, where
        an exception raised at any bytecode may land in importlib's callbacks (printed as ignored) or
        in Python code that C++ calls during the import, where it can abort the process."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        self.check()

    @contextlib.contextmanager
    def installed(self, restore: bool = True) -> Iterator[None]:
        """Handle SIGINT and SIGTERM inside; after, the caller's handlers again, or with
        ``restore=False`` (the program's own run, which exits next) both signals ignored: the
        interpreter's teardown (a third of a second once torch is loaded) puts back the default
        handlers of the signals Python handles, which would kill a command that has completed,
        with no word and the signal's exit status; an ignored one it leaves ignored.  (Blocking
        them would not do: torch's threads would take the signal.)  Off the main thread, which
        alone receives signals, it does nothing."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.received, self.deferred, self.holding = None, False, False
        previous_hook = sys.unraisablehook

        def unraisable(report: object) -> None:  # an Interrupted Python could not raise is in received: check() raises it
            if not isinstance(getattr(report, "exc_value", None), Interrupted):
                previous_hook(report)

        previous = {}
        try:  # inside: a signal that comes while the second handler goes in still finds everything put back
            sys.unraisablehook = unraisable
            for number in self.SIGNALS:
                previous[number] = signal.signal(number, self._handle)
            yield
        finally:
            self.deferred = True  # first, and no call: a signal from here on ends nothing half-way
            sys.unraisablehook = previous_hook
            if restore:
                for number, handler in previous.items():
                    signal.signal(number, handler if handler is not None else signal.SIG_DFL)
            else:
                for number in previous:
                    signal.signal(number, signal.SIG_IGN)


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
