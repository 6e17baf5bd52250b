"""Functional forms of the penalties, as the chip vendor's SDK names them; no registration needed.

They compute with exactly the arguments given.  On a registered model they read its tracked
weights (so ``exclude`` holds) and, whenever the arguments match its spec, return the
registry's numbers exactly::

    weight_magnitude_loss(model, reg.spec.limit, reg.power) == reg.penalty_terms().magnitude
    topology_loss(model, lam, reg.spec.group_size) == lam * reg.penalty_terms().topology

On an unregistered model they track the weights :func:`~nwave_param.register` would.
"""

from __future__ import annotations

import dataclasses

import torch  # noqa: F401  (the examples in the docstrings use it)
from torch import Tensor, nn

from nwave_param._engine import penalties
from nwave_param.core.discovery import patterns, select
from nwave_param.core.registry import registry_of
from nwave_param.core.settings import RegistrationSettings
from nwave_param.spec import ChipSpec

__all__ = ["topology_loss", "weight_magnitude_loss"]


def _sums(model: nn.Module, limit: float | None, group_size: int | None, power: int) -> tuple[Tensor, Tensor, int]:
    """Both sums over the tracked weights and their count; the spec is the registry's (or the
    default) with the given ``limit`` / ``group_size``."""
    try:
        reg = registry_of(model)
    except LookupError:
        selected = select(model, patterns(()))
        weights = [getattr(item.module, item.tensor_name) for item, _ in selected]
        layouts = [layout for _, layout in selected]
        spec = ChipSpec()
    else:
        weights, layouts, spec = reg.latent_weights(), reg.layouts, reg.spec
    changes = {key: value for key, value in (("limit", limit), ("group_size", group_size)) if value is not None}
    spec = dataclasses.replace(spec, **changes)
    magnitude, topology = penalties.penalty_sums(weights, layouts, spec, power)
    return magnitude, topology, max(sum(w.numel() for w in weights), 1)


def weight_magnitude_loss(model: nn.Module, limit: float = 0.9, power: int = 2) -> Tensor:
    r"""Mean over the tracked weights' elements of :math:`\mathrm{relu}(|w| - \text{limit})^{p}`.

    Args:
        model: a registered model (its tracked weights, as it reads them), or an unregistered one
            (the weights :func:`~nwave_param.register` would track).
        limit: the largest magnitude the chip holds, a finite number > 0.
        power: the exponent :math:`p`, 1 or 2.

    Returns:
        A 0-dim tensor, differentiable with respect to the weights.

    Raises:
        ValueError: ``limit`` is not a finite number > 0, or ``power`` not 1 or 2; ``model``'s
            registered parts have different settings; an unregistered ``model`` that
            :func:`~nwave_param.register` refuses (no trackable weight, ...).
        TypeError: ``model`` is not an nn.Module.

    Example::

        >>> model = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]))
        >>> round(weight_magnitude_loss(model, limit=0.9).item(), 6)   # ((1.0-0.9)^2 + (1.2-0.9)^2) / 6
        0.016667
    """
    power = RegistrationSettings(ChipSpec(limit), power=power).power  # validates both
    magnitude, _, count = _sums(model, limit, None, power)
    return magnitude / count


def topology_loss(model: nn.Module, lam: float = 1.0, group_size: int = 5) -> Tensor:
    r"""``lam`` times the mean over tracked elements of the block-column sign violations
    :math:`\min(P_{bj}, Q_{bj})` (see :mod:`nwave_param.functional`).

    Args:
        model: a registered model (its tracked weights, as it reads them), or an unregistered one
            (the weights :func:`~nwave_param.register` would track).
        lam: the scale, a finite number >= 0.
        group_size: the output neurons per block, a positive int.

    Returns:
        A 0-dim tensor, differentiable with respect to the weights.

    Raises:
        ValueError: ``lam`` is not a finite number >= 0, or ``group_size`` not a positive int;
            ``model``'s registered parts have different settings; an unregistered ``model`` that
            :func:`~nwave_param.register` refuses (no trackable weight, ...).
        TypeError: ``model`` is not an nn.Module.

    Example (one block of 3 neurons: column 0 has P = 1.7, Q = 0.2; column 1 has P = 0.4, Q = 1.0)::

        >>> model = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]))
        >>> round(topology_loss(model, lam=1.0).item(), 6)   # (0.2 + 0.4) / 6
        0.1
    """
    lam = RegistrationSettings(ChipSpec(group_size=group_size), lam=lam).lam  # validates both
    _, topology, count = _sums(model, None, group_size, 2)  # the power shapes the magnitude only
    return lam * (topology / count)
