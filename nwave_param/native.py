"""The C kernels in ``_kernels.c``: built once with the system C compiler, loaded with ctypes.

The build takes well under a second and is cached per source in ``$NWAVE_PARAM_CACHE`` (default
``~/.cache/nwave_param``).  Where no compiler works, or with ``NWAVE_PARAM_NATIVE=0``,
:func:`library` returns ``None`` and nwave_param computes the same math with torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ["library"]

_SOURCE = Path(__file__).with_name("_kernels.c")
_FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nwave_param"
    return Path(os.environ.get("NWAVE_PARAM_CACHE", default))


def _machine() -> str:
    """What ``-march=native`` depends on: a cached build is reused only on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), sys.platform)
    except OSError:
        return sys.platform


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        forward = getattr(lib, f"nwp_forward_{suffix}")
        forward.argtypes = [p, i64, p, i64, f64, i64, p, p]
        forward.restype = ctypes.c_int
        backward = getattr(lib, f"nwp_backward_{suffix}")
        backward.argtypes = [p, p, i64, p, i64, p, f64, i64, f64, f64]
        backward.restype = ctypes.c_int
    return lib


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or ``None`` (then the torch-op path is used)."""
    if os.environ.get("NWAVE_PARAM_NATIVE", "1") == "0":
        return None
    source = _SOURCE.read_bytes()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    tag = hashlib.sha256(source + " ".join([str(compiler), *_FLAGS, _machine()]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{tag}.so"
    try:
        if not target.exists():
            if compiler is None:
                raise OSError("no C compiler found (set CC)")
            target.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so")
            os.close(handle)
            try:
                subprocess.run(
                    [compiler, *_FLAGS, "-o", partial, str(_SOURCE), "-lm"],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                os.replace(partial, target)  # atomic: concurrent processes never load half a file
            finally:
                if os.path.exists(partial):
                    os.unlink(partial)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, subprocess.CalledProcessError, AttributeError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(
            f"nwave_param: C kernels unavailable ({str(detail).strip()[:200]}); using torch ops, "
            "which are correct but slower",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
