"""nwave_param: train PyTorch models that fit the Neuronova neuromorphic chip.

::

    import nwave_param as nwp
    reg = nwp.register(model)                 # track every weight; the model computes as before
    loss = task_loss + reg.penalty()          # steer toward |w| <= 0.9 and sign-aligned blocks of 5
"""

from .functional import Penalties
from .layout import Layout
from .parametrization import ChipConstraint
from .report import LayerReport, Report
from .registry import AlreadyRegisteredError, Registry, register, registry_of, trackable_weights
from .spec import ChipSpec

__all__ = [
    "AlreadyRegisteredError",
    "ChipConstraint",
    "ChipSpec",
    "LayerReport",
    "Layout",
    "Penalties",
    "Registry",
    "Report",
    "register",
    "registry_of",
    "trackable_weights",
]
__version__ = "0.1.0"
