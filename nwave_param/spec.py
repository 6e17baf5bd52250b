"""The hardware facts of the Neuronova chip."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["ChipSpec"]


@dataclass(frozen=True)
class ChipSpec:
    r"""What the chip can hold.

    * every weight :math:`w` satisfies :math:`|w| \le` ``limit`` (the limit itself is allowed);
    * output neurons sit in blocks of ``group_size`` consecutive rows, and within a block the
      weights coming from one input share a sign (zeros agree with either sign).

    The defaults are the Neuronova chip's.

    Example::

        >>> ChipSpec()
        ChipSpec(limit=0.9, group_size=5)
        >>> ChipSpec(limit=0.0)
        Traceback (most recent call last):
        ...
        ValueError: ChipSpec: limit must be a finite number > 0, got 0.0
    """

    limit: float = 0.9
    group_size: int = 5

    def __post_init__(self) -> None:
        limit, size = self.limit, self.group_size
        if isinstance(limit, bool) or not isinstance(limit, numbers.Real) or not (
            math.isfinite(limit) and limit > 0
        ):
            raise ValueError(f"ChipSpec: limit must be a finite number > 0, got {limit!r}")
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"ChipSpec: group_size must be a positive int, got {size!r}")
        object.__setattr__(self, "limit", float(limit))
        object.__setattr__(self, "group_size", int(size))
