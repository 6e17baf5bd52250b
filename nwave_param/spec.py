"""The hardware facts of the Neuronova chip."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["ChipSpec", "H1V1", "H1V2"]


@dataclass(frozen=True)
class ChipSpec:
    r"""What the chip can hold.

    * every weight :math:`w` satisfies :math:`|w| \le` ``limit`` (the limit itself is allowed);
    * output neurons sit in blocks of ``group_size`` consecutive rows, and within a block the
      weights coming from one input share a sign (zeros agree with either sign);
    * with ``bits`` set, weights are programmed on the symmetric grid
      :math:`k \cdot \text{limit} / (2^{\text{bits}-1} - 1)`, :math:`|k| \le 2^{\text{bits}-1} - 1`;
    * each programmed weight varies by fabrication mismatch, modelled as additive Gaussian noise
      of standard deviation ``mismatch``.

    The defaults are the H1v1 chip's (:data:`H1V1`).

    Example::

        >>> ChipSpec()
        ChipSpec(limit=0.9, group_size=5)
        >>> ChipSpec(limit=1.66, bits=5, mismatch=0.02)
        ChipSpec(limit=1.66, group_size=5, bits=5, mismatch=0.02)
        >>> ChipSpec(limit=0.0)
        Traceback (most recent call last):
        ...
        ValueError: ChipSpec: limit must be a finite number > 0, got 0.0
    """

    limit: float = 0.9
    group_size: int = 5
    bits: int | None = None
    mismatch: float = 0.0

    def __post_init__(self) -> None:
        limit, size, bits, mismatch = self.limit, self.group_size, self.bits, self.mismatch
        if not _is_real(limit) or not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"ChipSpec: limit must be a finite number > 0, got {limit!r}")
        if not _is_int(size) or size < 1:
            raise ValueError(f"ChipSpec: group_size must be a positive int, got {size!r}")
        if bits is not None and (not _is_int(bits) or not 2 <= bits <= 16):
            raise ValueError(f"ChipSpec: bits must be an int in [2, 16] or None, got {bits!r}")
        if not _is_real(mismatch) or not (math.isfinite(mismatch) and mismatch >= 0):
            raise ValueError(f"ChipSpec: mismatch must be a finite number >= 0, got {mismatch!r}")
        object.__setattr__(self, "limit", float(limit))
        object.__setattr__(self, "group_size", int(size))
        object.__setattr__(self, "bits", None if bits is None else int(bits))
        object.__setattr__(self, "mismatch", float(mismatch))

    @property
    def levels(self) -> int | None:
        """``2**(bits-1) - 1``: the largest ``|k|`` of the grid, or None without ``bits``."""
        return None if self.bits is None else 2 ** (self.bits - 1) - 1

    def __repr__(self) -> str:
        # the fields added after the first release appear only when set, so that old reprs still hold
        extra = "".join(
            f", {name}={value!r}" for name, value in (("bits", self.bits), ("mismatch", self.mismatch)) if value
        )
        return f"ChipSpec(limit={self.limit!r}, group_size={self.group_size!r}{extra})"


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


H1V1 = ChipSpec(limit=0.9, group_size=5)
"""The H1v1 chip: weights in [-0.9, 0.9], blocks of 5 output neurons (the default spec)."""

H1V2 = ChipSpec(limit=1.66, group_size=5)
"""The H1v2 chip: weights in [-1.66, 1.66], blocks of 5 output neurons."""
