"""The hardware facts of the Neuronova chip."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

__all__ = ["ChipSpec", "H1V1", "H1V2"]

RESETS = ("subtract", "zero", None)  # by subtracting the threshold, to zero, not checked


@dataclass(frozen=True)
class ChipSpec:
    r"""What the chip can hold.

    * every weight :math:`w` satisfies :math:`|w| \le` ``limit`` (the limit itself is allowed);
    * output neurons sit in blocks of ``group_size`` consecutive rows, and within a block the
      weights coming from one input share a sign (zeros agree with either sign);
    * with ``bits`` set, weights are programmed on the symmetric grid
      :math:`k \cdot \text{limit} / (2^{\text{bits}-1} - 1)`, :math:`|k| \le 2^{\text{bits}-1} - 1`;
    * each programmed weight varies by fabrication mismatch, modelled as additive Gaussian noise
      of standard deviation ``mismatch``;
    * the network fits the chip's ``cores`` (the neurons of each core): recurrent connections
      exist only within one core, and the front end's ``inputs`` channels each feed one neuron of
      the first layer (see :func:`nwave_param.place`);
    * one fixed firing threshold for the whole network; a neuron resets as ``reset`` says:
      ``"subtract"`` (the threshold is subtracted from the membrane), ``"zero"`` (the membrane
      goes to 0), or None (not checked).

    The defaults are the H1v1 chip's (:data:`H1V1`).  The capacities are from the vendor's SDK
    documentation, "Chip overview" (H1v1: 4 cores of 64 neurons; H1v2: cores of 50, 50 and 100;
    both: 16 front-end channels, each mapped one-to-one to a neuron of the first layer).

    Args:
        limit: the largest weight magnitude, a finite number > 0.
        group_size: the rows of a block whose weights from one input share a sign, a positive int.
        bits: the bits of the weight grid, an int in [2, 16], or None (no grid).
        mismatch: the standard deviation of the Gaussian noise on each programmed weight, >= 0.
        cores: the neurons of each core, a non-empty tuple of positive ints.
        inputs: the front end's channels, a positive int.
        reset: how a neuron resets: ``"subtract"``, ``"zero"``, or None (not checked).

    Example::

        >>> ChipSpec()
        ChipSpec(limit=0.9, group_size=5)
        >>> H1V2
        ChipSpec(limit=1.66, group_size=5, cores=(50, 50, 100), reset='subtract')
        >>> H1V2.replace(bits=5, mismatch=0.02)  # H1v2 with a 5-bit grid and mismatch: its cores kept
        ChipSpec(limit=1.66, group_size=5, bits=5, mismatch=0.02, cores=(50, 50, 100), reset='subtract')
        >>> ChipSpec(limit=0.0)
        Traceback (most recent call last):
        ...
        ValueError: ChipSpec: limit must be a finite number > 0, got 0.0

    Raises:
        ValueError: a field out of its domain (above), naming it.
    """

    limit: float = 0.9
    group_size: int = 5
    bits: int | None = None
    mismatch: float = 0.0
    cores: tuple[int, ...] = (64, 64, 64, 64)
    inputs: int = 16
    reset: str | None = "zero"

    def __post_init__(self) -> None:
        limit, size, bits, mismatch = self.limit, self.group_size, self.bits, self.mismatch
        cores, inputs = self.cores, self.inputs
        if not _is_real(limit) or not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"ChipSpec: limit must be a finite number > 0, got {limit!r}")
        if not _is_count(size):
            raise ValueError(f"ChipSpec: group_size must be a positive int, got {size!r}")
        if bits is not None and (not _is_int(bits) or not 2 <= bits <= 16):
            raise ValueError(f"ChipSpec: bits must be an int in [2, 16] or None, got {bits!r}")
        if not _is_real(mismatch) or not (math.isfinite(mismatch) and mismatch >= 0):
            raise ValueError(f"ChipSpec: mismatch must be a finite number >= 0, got {mismatch!r}")
        if not isinstance(cores, (tuple, list)) or not cores or not all(map(_is_count, cores)):
            raise ValueError(f"ChipSpec: cores must be a non-empty tuple of positive ints, got {cores!r}")
        if not _is_count(inputs):
            raise ValueError(f"ChipSpec: inputs must be a positive int, got {inputs!r}")
        if self.reset not in RESETS:
            raise ValueError(f"ChipSpec: reset must be one of {', '.join(map(repr, RESETS))}, got {self.reset!r}")
        object.__setattr__(self, "limit", float(limit))
        object.__setattr__(self, "group_size", int(size))
        object.__setattr__(self, "bits", None if bits is None else int(bits))
        object.__setattr__(self, "mismatch", float(mismatch))
        object.__setattr__(self, "cores", tuple(int(n) for n in cores))
        object.__setattr__(self, "inputs", int(inputs))

    @property
    def levels(self) -> int | None:
        """``2**(bits-1) - 1``: the largest ``|k|`` of the grid, or None without ``bits``."""
        return None if self.bits is None else 2 ** (self.bits - 1) - 1

    @property
    def essentials(self) -> tuple[float, int, int | None]:
        """``(limit, group_size, bits)``: what decides the values the chip holds of a weight.

        The mismatch says how chips vary, and the cores and inputs what network fits: none of
        them changes a weight's projection, so a checkpoint is read alike under any of them."""
        return self.limit, self.group_size, self.bits

    def replace(self, **changes: object) -> ChipSpec:
        """This spec with ``changes`` (field names as keywords), checked as at construction:
        ``H1V2.replace(bits=5, mismatch=0.02)`` is H1v2 with a grid and mismatch, its cores kept.

        Args:
            **changes: the fields to change, by name, and their new values.

        Returns:
            A new :class:`ChipSpec`; this one is left as it is (it is frozen).

        Raises:
            TypeError: a name that is no field.
            ValueError: a value out of its field's domain.
        """
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise TypeError(
                f"ChipSpec.replace: no field {', '.join(map(repr, unknown))} "
                f"(fields: {', '.join(f.name for f in dataclasses.fields(self))})"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """The spec as JSON-ready data.

        Returns:
            A dict of every field by name, ``cores`` as a list.
        """
        return {**dataclasses.asdict(self), "cores": list(self.cores)}

    def __repr__(self) -> str:
        # the fields added after the first release appear only when not their defaults, so that old reprs still hold
        extra = "".join(
            f", {field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)[2:]
            if getattr(self, field.name) != field.default
        )
        return f"ChipSpec(limit={self.limit!r}, group_size={self.group_size!r}{extra})"


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    """A positive int that a checkpoint's description can hold (64 bits, unsigned)."""
    return _is_int(value) and 1 <= value < 2**64


H1V1 = ChipSpec(limit=0.9, group_size=5, cores=(64, 64, 64, 64), inputs=16, reset="zero")
"""The H1v1 chip (the default spec): weights in [-0.9, 0.9], blocks of 5 output neurons, 4 cores of
64 neurons, 16 front-end channels ("Chip overview", H1v1; planned for deprecation by the vendor);
reset to zero ("Data formats", the hardware note: "the threshold is not tunable and zero
reset-mechanism")."""

H1V2 = ChipSpec(limit=1.66, group_size=5, cores=(50, 50, 100), inputs=16, reset="subtract")
"""The H1v2 chip (the evaluation kit's): weights in [-1.66, 1.66], blocks of 5 output neurons,
cores of 50, 50 and 100 neurons, 16 front-end channels ("Chip overview", H1v2); reset by
subtraction, the membrane clamped at 0 (tutorial "H1v2 model", the reset rule: "Fixed
(subtraction + non-negative clamp)")."""
