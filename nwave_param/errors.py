"""Errors about checkpoints, and messages that fit on one line.

:class:`CheckpointError` is the one error raised for a checkpoint nwave_param refuses, from
Python (:func:`nwave_param.check_state_dict`) and from the command line, which prints it as one
line with exit status 2.  :func:`one_line` makes any text fit in one: names, paths and messages
read from files or written by user code have their control characters escaped and are cut to a
few hundred characters.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator

__all__ = ["MESSAGE", "CheckpointError", "CheckpointWarning", "noticed", "one_line", "reason"]

SHOWN = 300  # characters of one name, path or message from outside in a message
MESSAGE = 2000  # characters of a whole message or note, its pieces from outside cut already


class CheckpointError(ValueError):
    """A checkpoint, or a request about one, that nwave_param refuses; its message is one line
    that names the weight, file or option and says what to do.  Nothing was changed or written."""


class CheckpointWarning(UserWarning):
    """What reading a state_dict noticed and worked around: a guessed layout, a skipped key, a
    spec other than the saved one.  The command line prints each as a ``note:`` line."""


@contextlib.contextmanager
def noticed(notes: list[str]) -> Iterator[None]:
    """Collect in ``notes`` the text of each :class:`CheckpointWarning` issued inside (each once),
    and let every other warning through as usual."""
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CheckpointWarning)
            yield
    finally:  # the other warnings are shown once the caller's filters are back
        for warning in caught:
            if not issubclass(warning.category, CheckpointWarning):
                warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
            elif str(warning.message) not in notes:
                notes.append(str(warning.message))


# C0 and C1 controls (newlines, the escape of a terminal sequence), the line and paragraph
# separators, bidirectional overrides, and lone surrogates (no terminal can print them); compiled
# at first use (re caches it), not at import: the command line imports this module before its
# signal handler is installed
_UNPRINTABLE = "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]"


def one_line(value: object, limit: int = SHOWN) -> str:
    """``value`` (a message, an exception, a name or a path) as one printable line.

    Control characters are escaped as Python writes them (a newline as ``\\n``, the start of a
    terminal escape sequence as ``\\x1b``), and a text longer than ``limit`` characters is cut in
    the middle, saying how much was cut.

    Example::

        >>> one_line("fc\\n\\x1b[2Jweight")
        'fc\\\\n\\\\x1b[2Jweight'
        >>> one_line("x" * 1000, limit=20)
        'xxxxxxxxxx…(980 characters)…xxxxxxxxxx'
    """
    text = str(value)
    if not text and isinstance(value, BaseException):
        text = type(value).__name__
    if len(text) > limit:
        keep = limit // 2
        text = f"{text[:keep]}…({len(text) - 2 * keep} characters)…{text[len(text) - keep:]}"
    return re.sub(_UNPRINTABLE, lambda match: repr(match[0])[1:-1], text)


def reason(error: BaseException) -> str:
    """The words of a library's error that say what went wrong, as one line (:func:`one_line`):
    the OSError behind a failed write (torch's writer wraps it in a RuntimeError), the reason
    torch's weights-only loader gives after its paragraph of advice, or else the first line."""
    return one_line(_reason(error))


def _reason(error: BaseException) -> str:
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    text = str(error).strip()
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("Weights only load failed"):
        return paragraphs[1]
    return text.splitlines()[0] if text else type(error).__name__
