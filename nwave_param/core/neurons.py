"""The spiking neurons nwave_param recognizes by their type."""

from __future__ import annotations

from torch import nn

__all__ = ["is_spiking", "neuron_modules", "neuron_types", "within"]


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


def is_spiking(module: nn.Module) -> bool:
    """Whether ``module`` is one of :func:`neuron_types`' spiking neurons."""
    spiking, silent = neuron_types()
    return isinstance(module, spiking) and not isinstance(module, silent)


def neuron_modules(model: nn.Module, named: set[str] = frozenset()) -> dict[str, nn.Module]:
    """The neuron modules of ``model`` by dotted name: the spiking ones and those ``named``; a
    neuron module inside another is part of that population."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not any(within(name, outer) for outer in found) and (name in named or is_spiking(module)):
            found[name] = module
    return found


def within(path: str, outer: str) -> bool:
    """Whether the module at dotted ``path`` is the module at ``outer`` or inside it."""
    return outer == "" or path == outer or path.startswith(f"{outer}.")
