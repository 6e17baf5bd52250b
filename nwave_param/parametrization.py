"""The parametrization that marks a weight as tracked by nwave_param."""

from __future__ import annotations

from torch import Tensor, nn

from .layout import Layout
from .spec import ChipSpec

__all__ = ["ChipConstraint"]


class ChipConstraint(nn.Module):
    r"""An identity parametrization :math:`W \mapsto W` that carries the chip constraint of one weight.

    Its ``forward`` returns its input, the same tensor object: where it is a weight's only
    parametrization, ``module.weight`` *is* the original Parameter, so the model computes
    bit-identical outputs, in-place init still reaches the weight and no memory is added.
    The penalties are computed on demand by the :class:`~nwave_param.Registry`, never as a
    side effect of ``forward``.

    The constraint holds the whole registration's configuration, so a registry can be rebuilt
    from the model alone (:func:`~nwave_param.registry_of`), after ``copy.deepcopy`` or in a
    DDP replica.  It has no parameters or buffers: it adds no state_dict entries.

    Args:
        name: dotted name of the weight as ``model.named_parameters()`` gave it at registration.
        index: position of the weight in the registration (keeps ``Registry.names`` ordered).
        layout: how the weight reads as a connectivity matrix.
        spec, alpha, lam, power: the registration's configuration.
        parameter_order: the owning module's ``_parameters`` keys before registration, so that
            ``remove()`` restores the state_dict key order.
    """

    def __init__(
        self,
        name: str,
        index: int,
        layout: Layout,
        spec: ChipSpec,
        alpha: float,
        lam: float,
        power: int,
        parameter_order: tuple[str, ...],
    ) -> None:
        super().__init__()
        self.name = name
        self.index = index
        self.layout = layout
        self.spec = spec
        self.alpha = alpha
        self.lam = lam
        self.power = power
        self.parameter_order = parameter_order

    def forward(self, weight: Tensor) -> Tensor:
        return weight

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Identity too, so assigning ``module.weight = value`` passes through the rest of the chain."""
        return weight

    def extra_repr(self) -> str:
        return f"{self.name!r}, limit={self.spec.limit}, group_size={self.spec.group_size}, {self.layout}"
