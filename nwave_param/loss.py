"""Functional forms of the penalties, as the chip vendor's SDK names them; no registration needed.

On a registered model they read the registry's tracked weights (so ``exclude`` holds) and
return its numbers exactly::

    weight_magnitude_loss(model) == reg.penalties().magnitude
    topology_loss(model, lam) == lam * reg.penalties().topology

On an unregistered model they track the weights :func:`~nwave_param.register` would.
"""

from __future__ import annotations

import torch  # noqa: F401  (the examples in the docstrings use it)
from torch import Tensor, nn

from .functional import Penalties
from .registry import _power, _scale, _select, compute_penalties, registry_of
from .spec import ChipSpec

__all__ = ["topology_loss", "weight_magnitude_loss"]


def _penalties(model: nn.Module, spec: ChipSpec, power: int) -> Penalties:
    try:
        reg = registry_of(model)
    except LookupError:
        selected = _select(model, ())
        weights = [getattr(item.module, item.tensor_name) for item, _ in selected]
        layouts = [layout for _, layout in selected]
    else:
        weights, layouts = reg.weights(), reg._layouts
    return compute_penalties(weights, layouts, spec, power)


def weight_magnitude_loss(model: nn.Module, limit: float = 0.9, power: int = 2) -> Tensor:
    r"""Mean over the tracked weights' elements of :math:`\mathrm{relu}(|w| - \text{limit})^{p}`.

    Example::

        >>> model = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]))
        >>> round(weight_magnitude_loss(model, limit=0.9).item(), 6)   # ((1.0-0.9)^2 + (1.2-0.9)^2) / 6
        0.016667
    """
    return _penalties(model, ChipSpec(limit=limit), _power(power)).magnitude


def topology_loss(model: nn.Module, lam: float = 1.0, group_size: int = 5) -> Tensor:
    r"""``lam`` times the mean over tracked elements of the block-column sign violations
    :math:`\min(P_{bj}, Q_{bj})` (see :mod:`nwave_param.functional`).

    Example (one block of 3 neurons: column 0 has P = 1.7, Q = 0.2; column 1 has P = 0.4, Q = 1.0)::

        >>> model = nn.Linear(2, 3)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[0.5, -1.0], [-0.2, 0.3], [1.2, 0.1]]))
        >>> round(topology_loss(model, lam=1.0).item(), 6)   # (0.2 + 0.4) / 6
        0.1
    """
    return _scale("lam", lam) * _penalties(model, ChipSpec(group_size=group_size), 2).topology
