"""The chip's own building blocks: its front end's one-to-one synapses, and its neurons.

* :class:`FrontEnd`: the chip's 16 front-end filters each feed one neuron of the first layer, a
  synapse with a diagonal weight matrix (the vendor's "Chip overview").  Its off-diagonal entries
  do not exist, so they are not stored: the gains are a depthwise ``(channels, 1, 1)`` weight
  applied as a grouped 1x1 convolution, read with ``Layout(groups=channels)``, so that the
  penalty, ``project_``, ``on_chip``'s mismatch and ``place`` all see one synapse per channel.
* :func:`ChipLeaky` and :func:`ChipRLeaky`: snnTorch's ``Leaky`` and ``RLeaky`` with the chip's
  neuron rules: the membrane clamped at 0 after each update (it is never negative on the chip),
  reset by subtraction (H1v2's, its tutorial says: "Fixed (subtraction + non-negative clamp)"),
  and one threshold for all of them (its value is not published: ``THRESHOLD``, 1.0, by default,
  as the demo's on H1v2; the demo passes 0.54 on H1v1, see docs/training-on-the-chip.md).
  snnTorch stays optional: they are made when first used.
"""

from __future__ import annotations

import inspect
import numbers

import torch
from torch import Tensor, nn

from nwave_param.layout import Layout

__all__ = ["THRESHOLD", "ChipLeaky", "ChipRLeaky", "FrontEnd"]

THRESHOLD = 1.0  # every chip neuron's, unless told otherwise: the chip has one, not published


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
        """
        flat = x.reshape(-1, self.channels, 1)
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
    """The chip's rules on an snnTorch neuron's membrane: clamped at 0 after each update."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        self.mem = self.mem.clamp(min=0)  # the state it keeps (init_hidden, or a next call without one)
        if isinstance(out, tuple):  # (spk, mem) or (spk, ..., mem): the membrane is last
            return (*out[:-1], out[-1].clamp(min=0))
        return out


_made: dict[str, type] = {}


def _chip_class(name: str) -> type:
    """The class of :func:`ChipLeaky`'s (``name``) neurons, made at its first use.  A pickle finds it
    by its qualified name, ``_ChipLeaky``, through this module's ``__getattr__``."""
    if name not in _made:
        base = getattr(_snntorch(), _BASES[name])
        doc = f"snnTorch's {_BASES[name]} with the chip's rules: membrane clamped at 0, reset by subtraction, one threshold."
        namespace = {"__doc__": doc, "__module__": __name__, "__qualname__": f"_{name}"}
        _made[name] = type(name, (_ChipNeuron, base), namespace)
    return _made[name]


def __getattr__(name: str) -> type:
    """``_ChipLeaky`` and ``_ChipRLeaky``: the neurons' classes, for ``pickle`` (``torch.save(model)``)."""
    if name.startswith("_") and name[1:] in _BASES:
        return _chip_class(name[1:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BASES = {"ChipLeaky": "Leaky", "ChipRLeaky": "RLeaky"}  # each chip neuron -> the snnTorch neuron it is


def _chip_neuron(name: str, args: tuple, kwargs: dict) -> nn.Module:
    """A ``name`` neuron from snnTorch's own arguments, positional or by keyword (bound as its
    ``__init__`` binds them, so a wrong one raises its ``TypeError``), the chip's threshold and
    reset where none is given."""
    cls = _chip_class(name)
    try:
        bound = inspect.signature(cls.__mro__[2].__init__).bind(None, *args, **kwargs)  # None: self
    except TypeError as error:
        raise TypeError(f"{name}: {error}; it takes snntorch.{_BASES[name]}'s arguments") from None
    if name == "ChipRLeaky" and not bound.arguments.get("all_to_all", True):
        raise ValueError(
            "ChipRLeaky: all_to_all=False keeps one recurrent weight per neuron (V) that nwave_param does not constrain; "
            "use all_to_all=True (its recurrent weight is constrained like every weight)"
        )
    bound.arguments.setdefault("threshold", THRESHOLD)
    bound.arguments.setdefault("reset_mechanism", "subtract")
    return cls(*bound.args[1:], **bound.kwargs)


def ChipLeaky(*args, **kwargs) -> nn.Module:  # noqa: N802
    """A leaky integrate-and-fire population as the chip computes it: snnTorch's ``Leaky``, taking
    the same arguments (positional or by keyword), whose membrane is clamped at 0 after each
    update, resetting by subtraction, with the chip's one threshold.  Pass
    ``reset_mechanism="zero"`` for H1v1's zero reset.

    Args:
        *args: snnTorch's ``Leaky`` arguments in its order (``beta, threshold, spike_grad, ...``).
        **kwargs: or by name; ``threshold`` is the one threshold of the whole network (default
            ``THRESHOLD``), ``reset_mechanism`` ``"subtract"`` (H1v2's, the default) or ``"zero"`` (H1v1's).

    Returns:
        The neuron module: an instance of a subclass of ``snntorch.Leaky``.

    Example::

        >>> lif = ChipLeaky(beta=0.9)
        >>> spikes, membrane = lif(torch.tensor([[-3.0, 1.5]]), lif.init_leaky())
        >>> spikes.tolist(), membrane.tolist()
        ([[0.0, 1.0]], [[0.0, 1.5]])

    Raises:
        ImportError: snnTorch is not installed.
        TypeError: arguments ``snntorch.Leaky`` does not take.
    """
    return _chip_neuron("ChipLeaky", args, kwargs)


def ChipRLeaky(*args, **kwargs) -> nn.Module:  # noqa: N802
    """A recurrent population as the chip computes it: snnTorch's ``RLeaky``, taking the same
    arguments (positional or by keyword; its all-to-all recurrent weight sits whole in one core),
    whose membrane is clamped at 0 after each update, resetting by subtraction, with the chip's
    one threshold.

    Args:
        *args: snnTorch's ``RLeaky`` arguments in its order (``beta, V, all_to_all, linear_features, ...``).
        **kwargs: or by name; ``threshold`` is the one threshold of the whole network (default
            ``THRESHOLD``), ``reset_mechanism`` ``"subtract"`` (H1v2's, the default) or ``"zero"`` (H1v1's).

    Returns:
        The neuron module: an instance of a subclass of ``snntorch.RLeaky``.

    Raises:
        ImportError: snnTorch is not installed.
        TypeError: arguments ``snntorch.RLeaky`` does not take.
        ValueError: ``all_to_all=False``: its per-neuron recurrent weight ``V`` is not a weight
            nwave_param constrains.
    """
    return _chip_neuron("ChipRLeaky", args, kwargs)
