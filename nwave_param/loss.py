"""The penalties as functions of a model, under the chip vendor's SDK names::

    from nwave_param.loss import topology_loss, weight_magnitude_loss   # as from nwavesdk.loss

The public path of :mod:`nwave_param.core.loss`, where they are defined.
"""

from nwave_param.core.loss import topology_loss, weight_magnitude_loss

__all__ = ["topology_loss", "weight_magnitude_loss"]
