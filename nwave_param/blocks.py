"""The chip's own building blocks: its front end's one-to-one synapses, and its neurons.

* :class:`FrontEnd`: the chip's 16 front-end filters each feed one neuron of the first layer, a
  synapse with a diagonal weight matrix (the vendor's "Chip overview").  Its off-diagonal entries
  do not exist, so they are not stored: the gains are a depthwise ``(channels, 1, 1)`` weight
  applied as a grouped 1x1 convolution, read with ``Layout(groups=channels)``, so that the
  penalty, ``project_``, ``on_chip``'s mismatch and ``place`` all see one synapse per channel.
* :class:`ChipLeaky` and :class:`ChipRLeaky`: snnTorch's ``Leaky`` and ``RLeaky`` with the chip's
  neuron rules: the membrane clamped at 0 after each update (it is never negative on the chip),
  reset by subtraction (H1v2's, its tutorial says: "Fixed (subtraction + non-negative clamp)"),
  and one threshold for all of them (its value is not published: ``THRESHOLD``, 1.0, by default,
  as the demo's on H1v2; the demo passes 0.54 on H1v1, see docs/training-on-the-chip.md).
  snnTorch stays optional: the classes are made when first looked up (``nwp.ChipLeaky``, or
  ``from nwave_param.blocks import ChipLeaky``), which imports snnTorch; without it they are
  stand-ins whose construction raises the ``ImportError`` that says what to install.

Example::

    >>> from nwave_param.blocks import ChipLeaky
    >>> lif = ChipLeaky(beta=0.9)  # the membrane of a negative input stays at 0
    >>> spikes, membrane = lif(torch.tensor([[-3.0, 1.5]]), lif.init_leaky())
    >>> spikes.tolist(), membrane.tolist(), isinstance(lif, ChipLeaky)
    ([[0.0, 1.0]], [[0.0, 1.5]], True)
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import Tensor, nn

from nwave_param.layout import Layout

__all__ = ["THRESHOLD", "ChipLeaky", "ChipRLeaky", "FrontEnd"]  # noqa: F822 (the neurons: made at first lookup, __getattr__)

THRESHOLD = 1.0  # every chip neuron's, unless told otherwise: the chip has one, not published


def _channels_last(x: Tensor, channels: int) -> Tensor:
    """``x``, refused unless its last dim is the ``channels`` (channels-first data would take
    each gain by position); a leaf to torch.fx's symbolic tracing, whose proxies have no shape,
    and TorchScript's subset of Python."""
    if x.dim() == 0 or x.shape[-1] != channels:
        hint = ""  # a 0-dim or 1-dim input holds no channels dim to move
        if x.dim() == 2:
            hint = "; move the channels last (e.g. x.T)"
        elif x.dim() > 2:
            hint = "; move the channels last (e.g. x.movedim(1, -1))"
        raise ValueError(f"FrontEnd: expected an input of shape (..., {channels}), its last dim the channels, got {list(x.shape)}{hint}")
    return x


torch.fx.wrap("_channels_last")


class FrontEnd(nn.Module):
    """One-to-one synapses from ``channels`` inputs to as many neurons: ``y[..., i] = gain[i] * x[..., i]``.

    The gains are ``weight``, of shape ``(channels, 1, 1)`` (the gain of channel ``i`` is
    ``weight[i, 0, 0]``), saved as ``<name>.weight`` (``<name>.parametrizations.weight.original``
    once registered), initialized to ``gain``.  They are constrained like every weight: in range,
    on the grid, with mismatch on the chip; an entry off the diagonal does not exist, so nothing
    trains, projects or perturbs it.

    Args:
        channels: the inputs, and as many neurons (the chip's front end has ``spec.inputs``, 16).
        gain: every channel's initial gain.

    Example::

        >>> front = FrontEnd(16, gain=2.0)
        >>> front(torch.ones(3, 16)).shape, front.weight.shape
        (torch.Size([3, 16]), torch.Size([16, 1, 1]))

    Raises:
        ValueError: ``channels`` not a positive int, or ``gain`` not a finite number.
    """

    def __init__(self, channels: int, gain: float = 1.0) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1:
            raise ValueError(f"FrontEnd: channels must be a positive int, got {channels!r}")
        if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not torch.isfinite(torch.tensor(float(gain))):
            raise ValueError(f"FrontEnd: gain must be a finite number, got {gain!r}")
        self.channels = int(channels)
        self.weight = nn.Parameter(torch.full((self.channels, 1, 1), float(gain)))

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (``(..., channels)``) times the gains, channel by channel: a grouped 1x1
        convolution, so that a trace reads one synapse per channel.

        Args:
            x: the input, its last dim the ``channels``.

        Returns:
            ``gain[i] * x[..., i]`` for each channel ``i``, of the shape of ``x``.

        Raises:
            ValueError: the last dim of ``x`` is not ``channels`` (channels-first data would
                otherwise take its gains by position).
        """
        flat = _channels_last(x, self.channels).reshape(-1, self.channels, 1)
        return nn.functional.conv1d(flat, self.weight, groups=self.channels).reshape(x.shape)

    def chip_layout(self, tensor_name: str) -> Layout:
        """How nwave_param reads ``weight``: ``channels`` groups of one synapse each.

        Args:
            tensor_name: the weight's name (``weight``).

        Returns:
            ``Layout(groups=channels)``.
        """
        return Layout(groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def _snntorch():
    try:
        import snntorch
    except ImportError:
        raise ImportError("the chip neurons are snnTorch neurons: pip install snntorch") from None
    return snntorch


class _ChipNeuron:
    """The chip's rules on an snnTorch neuron: its arguments bound as snnTorch binds them (the
    chip's threshold and reset where none is given), the membrane clamped at 0 after each update."""

    def __init__(self, *args, **kwargs) -> None:
        name, base = type(self)._chip_name, type(self)._snntorch_base
        try:
            bound = inspect.signature(base.__init__).bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{name}: {error}; it takes snntorch.{base.__name__}'s arguments") from None
        if "all_to_all" in bound.signature.parameters and not bound.arguments.get("all_to_all", True):
            raise ValueError(
                f"{name}: all_to_all=False keeps one recurrent weight per neuron (V) that nwave_param does not constrain; "
                "use all_to_all=True (its recurrent weight is constrained like every weight)"
            )
        if bound.arguments.get("conv2d_channels") is not None:
            raise ValueError(
                f"{name}: conv2d_channels makes the recurrence a convolution, which the chip holds unrolled, its blocks of "
                "5 neurons fed from kernel offsets nwave_param does not constrain to share a sign; use linear_features"
            )
        bound.arguments.setdefault("threshold", THRESHOLD)
        bound.arguments.setdefault("reset_mechanism", "subtract")
        super().__init__(*bound.args[1:], **bound.kwargs)

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.mem = self.mem.clamp(min=0)  # the state it keeps (init_hidden, or a next call without one)
        if isinstance(out, tuple):  # (spk, mem) or (spk, ..., mem): the membrane is last
            return (*out[:-1], out[-1].clamp(min=0))
        return out


_DOCS = {
    "ChipLeaky": """A leaky integrate-and-fire population as the chip computes it: a subclass of snnTorch's
    ``Leaky``, taking its arguments (positional or by name), whose membrane is clamped at 0 after
    each update, resetting by subtraction, with the chip's one threshold.  Pass
    ``reset_mechanism="zero"`` for H1v1's zero reset.

    Args:
        *args: snnTorch's ``Leaky`` arguments in its order (``beta, threshold, spike_grad, ...``).
        **kwargs: or by name; ``threshold`` is the one threshold of the whole network (default
            ``THRESHOLD``), ``reset_mechanism`` ``"subtract"`` (H1v2's, the default) or ``"zero"`` (H1v1's).

    Example: in this module's docstring.

    Raises:
        ImportError: snnTorch is not installed (the class is then a stand-in).
        TypeError: arguments ``snntorch.Leaky`` does not take.
    """,
    "ChipRLeaky": """A recurrent population as the chip computes it: a subclass of snnTorch's ``RLeaky``,
    taking its arguments (positional or by name; its all-to-all recurrent weight sits whole in one
    core), whose membrane is clamped at 0 after each update, resetting by subtraction, with the
    chip's one threshold.

    Args:
        *args: snnTorch's ``RLeaky`` arguments in its order (``beta, V, all_to_all, linear_features, ...``).
        **kwargs: or by name; ``threshold`` is the one threshold of the whole network (default
            ``THRESHOLD``), ``reset_mechanism`` ``"subtract"`` (H1v2's, the default) or ``"zero"`` (H1v1's).

    Raises:
        ImportError: snnTorch is not installed (the class is then a stand-in).
        TypeError: arguments ``snntorch.RLeaky`` does not take.
        ValueError: ``all_to_all=False``: its per-neuron recurrent weight ``V`` is not a weight
            nwave_param constrains; ``conv2d_channels``: a convolutional recurrence, whose
            unrolled sign blocks nwave_param does not constrain.
    """,
}
_BASES = {"ChipLeaky": "Leaky", "ChipRLeaky": "RLeaky"}  # each chip neuron -> the snnTorch neuron it is
_made: dict[str, type] = {}


def _chip_class(name: str) -> type:
    """The class ``name`` (``ChipLeaky``, ``ChipRLeaky``), made at its first use: snnTorch stays
    optional until then.  Without snnTorch, a stand-in whose construction raises the
    ``ImportError`` (so that ``hasattr``, ``import *`` and ``help`` still work)."""
    if name not in _made:
        try:
            base = getattr(_snntorch(), _BASES[name])
        except ImportError as missing:
            message = str(missing)

            def refuse(self, *args, **kwargs):
                raise ImportError(message)

            doc = f"{_DOCS[name]}\n    snnTorch is not installed: constructing one raises ImportError.\n"
            _made[name] = type(name, (), {"__doc__": doc, "__module__": __name__, "__qualname__": name, "__init__": refuse})
        else:
            namespace = {
                "__doc__": _DOCS[name], "__module__": __name__, "__qualname__": name, "__signature__": inspect.signature(base),
                "_chip_name": name, "_snntorch_base": base,
            }
            _made[name] = type(name, (_ChipNeuron, base), namespace)
    return _made[name]


def __getattr__(name: str) -> type:
    """``ChipLeaky`` and ``ChipRLeaky``, made when first looked up (importing snnTorch then), and
    ``_ChipLeaky``, ``_ChipRLeaky``: the same classes under the names 0.4 pickled them by."""
    chip = name.removeprefix("_")
    if chip in _BASES:
        return _chip_class(chip)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_BASES})
