"""How a weight tensor is read as the chip's connectivity matrix.

A :class:`Layout` turns a weight into a matrix ``M`` (rows = output neurons, columns =
presynaptic inputs) and says where the rows are cut: at population borders (the gates of an
LSTM/GRU), at convolution-group borders, and into blocks of ``group_size`` inside each
population.  Columns of ``M`` are *local*: for a grouped convolution the dense-equivalent
matrix is zero wherever an (output, input) channel pair is not connected, and a zero never
conflicts with either sign, so cutting the rows at group borders and keeping each group's own
columns gives exactly the dense matrix's block columns without materializing its zeros.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nwave_param._memo import memoized

__all__ = ["Layout", "layout_of"]


@dataclass(frozen=True)
class Layout:
    """The reading of one weight.

    Args:
        gates: number of stacked populations in the rows (4 for LSTM ``weight_ih``/``weight_hh``,
            3 for GRU, else 1).
        groups: convolution groups; rows of different groups share no column.
        transposed: the weight is a ``ConvTranspose`` weight ``(in, out/groups, *kernel)``.
        inputs_first: a 2-D weight stored ``[in, out]``, its rows the inputs, as the chip
            vendor's SDK stores synapses and as ``x @ W`` reads them (torch's ``F.linear`` reads
            ``[out, in]``, the default).

    Example::

        >>> Layout(inputs_first=True).matrix(torch.arange(6.0).view(3, 2))  # 3 inputs, 2 outputs
        tensor([[0., 2., 4.],
                [1., 3., 5.]])

    Raises:
        ValueError: ``gates`` or ``groups`` is not an int >= 1, ``transposed`` or ``inputs_first``
            not a bool, or ``inputs_first`` is set with ``groups`` > 1 or ``transposed``.
    """

    gates: int = 1
    groups: int = 1
    transposed: bool = False
    inputs_first: bool = False

    def __post_init__(self) -> None:
        flags = (self.transposed, self.inputs_first)
        if not all(type(n) is int and n >= 1 for n in (self.gates, self.groups)) or not all(type(f) is bool for f in flags):
            raise ValueError(f"not a layout: {self!r} (gates and groups are ints >= 1, transposed and inputs_first bools)")
        if self.inputs_first and (self.transposed or self.groups > 1):
            raise ValueError(f"not a layout: {self!r} (inputs_first reads a 2-D weight; groups and transposed read a convolution's)")

    def __repr__(self) -> str:
        # inputs_first came after the first release: shown only when set, so that old reprs still hold
        shown = f", inputs_first={self.inputs_first}" if self.inputs_first else ""
        return f"Layout(gates={self.gates}, groups={self.groups}, transposed={self.transposed}{shown})"

    def rows(self, shape: torch.Size) -> int:
        """Number of output neurons of a weight of this ``shape``.

        Args:
            shape: the weight's shape (2 or more dims).

        Returns:
            The number of rows of its matrix ``M``.
        """
        return shape[1] * self.groups if self.transposed else shape[1] if self.inputs_first else shape[0]

    def check(self, shape: torch.Size, name: str) -> None:
        """Raise ValueError, naming ``name``, if a weight of ``shape`` cannot be read with this
        layout: the gates split the output rows, the groups split dim 0 (the output rows, or a
        transposed convolution's input channels), a convolution's reading (groups, transposed)
        is of a convolution's weight, ``(channels, channels, *kernel)``: 3 or more dims, and an
        inputs-first reading of a 2-D weight.

        Args:
            shape: the weight's shape.
            name: the weight's name, for the message.

        Raises:
            ValueError: ``shape`` has fewer than 2 dims, or this layout cannot read it; the
                message names ``name`` and each problem.
        """
        if len(shape) < 2:
            raise ValueError(f"{name}: a tracked weight needs 2 or more dims, got shape {tuple(shape)}")
        rows = self.rows(shape)
        convolution = [f"groups={self.groups}"] * (self.groups > 1) + ["transposed=True"] * self.transposed
        problems = (
            [f"{' and '.join(convolution)} describe a convolution, whose weight has 3 or more dims, not {len(shape)}"]
            if convolution and len(shape) < 3 else []
        )
        problems += [f"inputs_first reads a 2-D weight, not one of {len(shape)} dims"] if self.inputs_first and len(shape) != 2 else []
        problems += [f"its {rows} output rows do not split into {self.gates} gates"] if rows % self.gates else []
        problems += [f"dim 0 ({shape[0]}) does not split into {self.groups} groups"] if shape[0] % self.groups else []
        if problems:
            raise ValueError(f"{name} of shape {tuple(shape)} cannot be read with {self}: {'; '.join(problems)}")

    def matrix(self, weight: Tensor) -> Tensor:
        """``M`` with local columns: ``(rows, columns of one group)``; a view where possible.

        Args:
            weight: a weight this layout reads (:meth:`check` says whether it does).

        Returns:
            The connectivity matrix, ``(rows, columns of one group)``.
        """
        if self.inputs_first:
            return weight.t()
        kernel = math.prod(weight.shape[2:])  # explicit sizes: reshape(0, -1) is ambiguous
        if not self.transposed:
            return weight.reshape(weight.shape[0], weight.shape[1] * kernel)
        g = self.groups
        inputs, outputs_per_group = weight.shape[:2]
        blocks = weight.reshape(g, inputs // g, outputs_per_group, kernel).transpose(1, 2)
        return blocks.reshape(g * outputs_per_group, inputs // g * kernel)

    def unmatrix(self, m: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`matrix`: the weight of ``shape`` whose matrix is ``m``.

        Args:
            m: a matrix as :meth:`matrix` gives it.
            shape: the weight's shape.

        Returns:
            The weight of ``shape`` whose matrix is ``m``.
        """
        if self.inputs_first:
            return m.t()
        if not self.transposed:
            return m.reshape(shape)
        g = self.groups
        inputs, outputs_per_group = shape[:2]
        blocks = m.reshape(g, outputs_per_group, inputs // g, math.prod(shape[2:])).transpose(1, 2)
        return blocks.reshape(shape)

    def to_dict(self) -> dict[str, int | bool]:
        """JSON-ready form, as a checkpoint stores it.

        Returns:
            A dict of ``gates``, ``groups``, ``transposed`` and ``inputs_first``.
        """
        return {"gates": self.gates, "groups": self.groups, "transposed": self.transposed, "inputs_first": self.inputs_first}

    @classmethod
    def from_dict(cls, data: object) -> Layout:
        """Inverse of :meth:`to_dict` (version 0.2 wrote no ``inputs_first``).

        Args:
            data: a dict as :meth:`to_dict` gives it.

        Returns:
            The :class:`Layout` it describes.

        Raises:
            ValueError: ``data`` is not such a dict, or its values are not a layout's.
        """
        keys = {"gates", "groups", "transposed"}
        if not isinstance(data, dict) or set(data) not in (keys, keys | {"inputs_first"}):
            raise ValueError(f"not a layout: {data!r}")
        return cls(data["gates"], data["groups"], data["transposed"], data.get("inputs_first", False))

    def runs(self, rows: int, group_size: int) -> tuple[tuple[int, int, int], ...]:
        """The row blocks as runs ``(start, count, length)`` of equal-length consecutive blocks.

        Blocks are ``group_size`` rows inside each population (the last one may be shorter),
        cut again at convolution-group borders.  Runs let a whole stretch of blocks be summed
        with one ``view(count, length, columns)``.

        Args:
            rows: the rows of the matrix (:meth:`rows`).
            group_size: the rows of a block (``spec.group_size``).

        Returns:
            The runs, in the order of the rows, covering every row once.
        """
        return _runs(rows, self.gates, self.groups, group_size)


@memoized(4096)
def _runs(rows: int, gates: int, groups: int, group_size: int) -> tuple[tuple[int, int, int], ...]:
    if rows == 0:
        return ()
    cuts = {rows}
    population = rows // gates
    for start in range(0, rows, population):
        cuts.update(range(start, start + population, group_size))
    cuts.update(range(0, rows, rows // groups))
    bounds = sorted(cuts)
    runs: list[list[int]] = []
    for start, stop in zip(bounds, bounds[1:]):
        length = stop - start
        if runs and runs[-1][2] == length:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, length])
    return tuple(tuple(run) for run in runs)


_GATES = {"LSTM": 4, "GRU": 3}


def layout_of(module: nn.Module, tensor_name: str) -> Layout:
    """The layout of ``module.<tensor_name>``, from the module's type (parametrized or not), or
    as the module says itself: ``module.chip_layout(tensor_name)``, where it has one
    (:class:`~nwave_param.FrontEnd` does).

    Args:
        module: the module holding the weight.
        tensor_name: the weight's name in ``module`` (``weight``, ``weight_hh_l0`` ...).

    Returns:
        The :class:`Layout`; a plain ``Layout()`` where the type has no rule.
    """
    own = getattr(module, "chip_layout", None)
    if callable(own):
        return own(tensor_name)
    cls = parametrize.type_before_parametrizations(module)
    if issubclass(cls, nn.modules.conv._ConvTransposeNd):
        return Layout(groups=module.groups, transposed=True)
    if issubclass(cls, nn.modules.conv._ConvNd):
        return Layout(groups=module.groups)
    gated = tensor_name.startswith(("weight_ih", "weight_hh"))
    if gated and issubclass(cls, nn.RNNBase):
        return Layout(gates=_GATES.get(module.mode, 1))
    if gated and issubclass(cls, nn.LSTMCell):
        return Layout(gates=4)
    if gated and issubclass(cls, nn.GRUCell):
        return Layout(gates=3)
    return Layout()


RNN_WEIGHT = re.compile(r"^weight_(?:ih|hh)(?P<suffix>_l\d+(?:_reverse)?)?$")  # torch's RNN-family names


def rnn_gates(hh_shape: tuple[int, ...] | None, hr_shape: tuple[int, ...] | None = None) -> int | None:
    """The gates of an RNN (1), GRU (3) or LSTM (4) layer, told by its ``weight_hh`` shape
    (``(gates * hidden, hidden)``, or ``(gates * hidden, proj)`` beside an LSTM's ``weight_hr`` of
    shape ``(proj, hidden)``); None when the shapes fit none of them."""
    if hh_shape is None or len(hh_shape) != 2:
        return None
    hidden = hr_shape[1] if hr_shape is not None and len(hr_shape) == 2 else hh_shape[1]
    gates, rest = divmod(hh_shape[0], hidden) if hidden else (0, 1)
    return gates if not rest and gates in (1, 3, 4) else None
