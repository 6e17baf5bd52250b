"""The spiking neurons nwave_param recognizes by their type."""

from __future__ import annotations

__all__ = ["neuron_types"]


def neuron_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The spiking-neuron classes :func:`~nwave_param.place` finds by itself, and those it leaves
    out: snnTorch's ``SpikingNeuron`` (Leaky, RLeaky, Synaptic, RSynaptic, SLSTM, ...) and Norse's
    neuron modules and cells (LIF, LIFRecurrent, LIFCell, LIFRecurrentCell, ...), each when
    installed; but not Norse's leaky integrators (LI, LICell, LIBoxCell), which do not spike."""
    found: list[type] = []
    silent: list[type] = []
    try:
        from snntorch._neurons import SpikingNeuron

        found.append(SpikingNeuron)
    except ImportError:
        pass
    try:
        from norse.torch.module.snn import SNN, SNNCell, SNNRecurrent, SNNRecurrentCell

        found += [SNN, SNNCell, SNNRecurrent, SNNRecurrentCell]
        from norse.torch.module.leaky_integrator import LI, LICell
        from norse.torch.module.leaky_integrator_box import LIBoxCell

        silent += [LI, LICell, LIBoxCell]
    except ImportError:
        pass
    return tuple(found), tuple(silent)
