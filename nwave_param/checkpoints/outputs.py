"""Files one command writes, all or none.

:func:`check_destinations` before any work: an output is a regular file or new, its directory
exists, and it is never the input.  Then :class:`Outputs`: every file written to a temporary
file beside it, then all renamed into place once each is complete, with the mode a plain
``open()`` would give; on any failure, Ctrl-C included, nothing is left behind and no file is
replaced.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Sequence
from typing import BinaryIO

from nwave_param.errors import CheckpointError, one_line, reason

__all__ = ["Outputs", "check_destinations"]


_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def check_destinations(destinations: Sequence[tuple[str, str]], source: str | None = None) -> None:
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
            raise CheckpointError(f"cannot write {option} {shown}: {error.strerror}") from None
        if mode is not None and not stat.S_ISREG(mode):
            kind = next((kind for test, kind in _KINDS.items() if test(mode)), "not a regular file")
            raise CheckpointError(f"{option} {shown} is {kind}: nwave-param writes regular files only; choose a file path")
        directory = os.path.dirname(os.path.realpath(path))
        if not os.path.isdir(directory):
            raise CheckpointError(f"cannot write {shown}: no directory {one_line(directory)}")
        if source is not None and mode is not None and os.path.exists(source) and os.path.samefile(path, source):
            raise CheckpointError(f"refusing to overwrite the input {one_line(source)}: choose another {option}")
    targets = [os.path.realpath(path) for _, path in destinations]
    if len(set(targets)) < len(targets):
        raise CheckpointError(f"{' and '.join(option for option, _ in destinations)} name the same file")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it; set straight back
    os.umask(mask)
    return mask


def _mode_for(target: str) -> int:
    """What a plain ``open(target, "w")`` gives: the mode of the file it replaces, or 0o666 minus the umask."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


class Outputs:
    """The files one command writes, all or none.

    :meth:`add` writes each to a temporary file beside it (``.nwave-param-*.tmp``, with the mode
    a plain ``open()`` would give); :meth:`commit` renames them all into place once every one is
    complete.  Leaving the ``with`` block any other way (a failed write, a full disk, Ctrl-C)
    removes every temporary file: no output is replaced, nothing is left behind.  A symbolic
    link is written through, as ``open()`` would.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[str, str, str]] = []  # (path as given, target, temporary file)

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, *_) -> None:
        for _, _, temporary in self._pending:
            try:
                os.unlink(temporary)
            except OSError:
                pass
        self._pending = []

    def add(self, path: str, write: Callable[[BinaryIO], None]) -> None:
        """Write ``path``'s content, by ``write(stream)``, to its temporary file."""
        target = os.path.realpath(path)
        mode = _mode_for(target)
        # the name is known before the file exists, so that an interruption at any point leaves it known
        temporary = os.path.join(os.path.dirname(target), f".nwave-param-{secrets.token_hex(8)}.tmp")
        self._pending.append((path, target, temporary))
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(handle, mode)
            except OSError:
                os.close(handle)
                raise
        except OSError as error:
            raise CheckpointError(f"cannot write {one_line(path)}: {reason(error)}; nothing was written") from None
        try:
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                os.fsync(stream.fileno())
        except KeyboardInterrupt:
            raise CheckpointError(f"interrupted while writing {one_line(path)}: nothing was written") from None
        except (OSError, RuntimeError) as error:
            raise CheckpointError(f"cannot write {one_line(path)}: {reason(error)}; nothing was written") from None

    def add_text(self, path: str, text: str) -> None:
        self.add(path, lambda stream: stream.write(text.encode()))

    def commit(self) -> None:
        """Rename every temporary file over its output (a rename in one directory: complete or not done)."""
        written = []
        while self._pending:
            path, target, temporary = self._pending[0]
            try:
                os.replace(temporary, target)
            except OSError as error:
                done = f"wrote {', '.join(map(one_line, written))}, but " if written else ""
                raise CheckpointError(f"{done}cannot write {one_line(path)}: {reason(error)}; {one_line(path)} was not written") from None
            self._pending.pop(0)
            written.append(path)
