r"""The parametrization: a weight's chip constraint, and what the network computes with.

:class:`ChipConstraint` is registered with ``torch.nn.utils.parametrize`` on each tracked weight,
last in any existing chain.  For the latent weight :math:`w` (the Parameter, or what earlier
parametrizations make of it) ``module.weight`` returns

.. math:: w_\text{eff} = w + h\,(\mathrm{chip}(w) - w)

with the registration's hardness :math:`h \in [0, 1]` and a straight-through gradient; at
:math:`h = 0` it is :math:`w` itself, the same tensor object.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nwave_param import description, functional
from nwave_param.core.settings import Registration, RegistrationSettings, per_thread, settings_in_effect
from nwave_param.layout import Layout

__all__ = ["ChipConstraint"]


class ChipConstraint(nn.Module):
    r"""The chip constraint of one weight: :math:`w \mapsto w + h\,(\mathrm{chip}(w) - w)`.

    ``chip(w)`` is what :meth:`Registry.project_ <nwave_param.Registry.project_>` would write
    (:func:`nwave_param.functional.project`); the gradient passes straight through to :math:`w`.
    At hardness 0 the forward returns its input, the same tensor object: the model computes
    bit-identical outputs, in-place init reaches the weight and no memory is added.

    It holds what its forward needs (the layout and its :class:`Registration`) and the owning
    module's parameter order, so that removal restores the state_dict key order.  It adds no
    parameters or buffers; its extra state, saved in the state_dict, is its
    :mod:`~nwave_param.description` (layout, spec and hardness) as a small tensor.

    Args:
        layout: how the weight reads as a connectivity matrix.
        registration: the :class:`~nwave_param.core.settings.Registration` the constraints of one
            registration share (its settings: spec, penalty strengths, hardness).
        parameter_order: the names of the owning module's parameters before registration, in
            order.

    Register it with :func:`nwave_param.register`, which also gives the module a class of its
    own and the hooks that load checkpoints::

        >>> import nwave_param as nwp
        >>> fc = nn.Linear(2, 3, bias=False)
        >>> reg = nwp.register(fc)
        >>> fc.parametrizations.weight[0]
        ChipConstraint(ChipSpec(limit=0.9, group_size=5), Layout(gates=1, groups=1, transposed=False), hardness=0.0)
    """

    def __init__(self, layout: Layout, registration: Registration, parameter_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.layout = layout
        self.registration = registration
        self.parameter_order = parameter_order
        # Registry.on_chip: one chip instance, its mismatch sample (or None); plain attributes,
        # which torch.compile guards, and which a copy does not take (see __getstate__)
        self.on_chip = False
        self.chip_mismatch: Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(on_chip=False, chip_mismatch=None)  # a copy made inside on_chip is not on a chip
        return state

    @property
    def settings(self) -> RegistrationSettings:
        """The registration's current settings."""
        return self.registration.settings

    def forward(self, weight: Tensor) -> Tensor:
        r"""What the module computes with: :math:`w + h\,(\mathrm{chip}(w) - w)`, at the hardness in effect.

        In training mode with ``spec.mismatch`` (and :math:`h > 0`), a fresh mismatch sample is
        added each call; inside :meth:`Registry.on_chip <nwave_param.Registry.on_chip>`, it is what
        that chip holds, whatever the hardness and the mode.

        Args:
            weight: the latent weight :math:`w`.

        Returns:
            The effective weight (at hardness 0, off a chip, ``weight`` itself).
        """
        settings = settings_in_effect(self.registration)  # read once: a concurrent harden() swaps it whole
        spec, hardness = settings.spec, settings.hardness
        if self.on_chip and not getattr(per_thread, "tracing", False):  # what one chip holds, whatever the hardness and mode
            return functional.harden(weight, self.layout, spec, 1.0, self.chip_mismatch)
        noise = None
        if spec.mismatch and hardness and self.training:  # a fresh mismatch sample per forward pass
            noise = torch.randn_like(weight).mul_(spec.mismatch)
        return functional.harden(weight, self.layout, spec, hardness, noise)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """Identity, so assigning ``module.weight = value`` stores ``value`` as the latent weight.

        Args:
            weight: the value assigned.

        Returns:
            ``weight`` itself.
        """
        return weight

    def get_extra_state(self) -> Tensor:
        """The description saved in the state_dict: the layout, the spec and the hardness.

        Returns:
            The description, encoded as a small tensor (:func:`nwave_param.description.encode`).
        """
        settings = self.registration.settings
        return description.encode(self.layout, settings.spec, settings.hardness)

    def set_extra_state(self, state: object) -> None:
        """Check a checkpoint's description against this constraint (the model's load hook has
        already checked every one and restored the hardness, before any tensor was copied).

        Args:
            state: the description saved in the checkpoint.

        Raises:
            ValueError: the description cannot be read or does not fit this constraint's layout
                and spec; or it was written by a newer nwave_param
                (:class:`~nwave_param.description.NewerDescriptionError`).
        """
        saved = description.decode(state)
        if saved is None or not saved.fits(self.layout, self.settings.spec):
            raise ValueError(
                f"a checkpoint's description {saved or 'that cannot be read'} does not fit this constraint ({self.extra_repr()})"
            )

    def extra_repr(self) -> str:
        """What the module's repr shows: the spec, the layout and the hardness.

        Returns:
            ``"<spec>, <layout>, hardness=<h>"``.
        """
        return f"{self.settings.spec}, {self.layout}, hardness={self.settings.hardness}"
