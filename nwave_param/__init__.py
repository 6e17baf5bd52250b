"""nwave_param: train PyTorch models that fit the Neuronova neuromorphic chip.

::

    import nwave_param as nwp
    reg = nwp.register(model)                 # track every weight; the model computes as before
    loss = task_loss + reg.penalty()          # steer toward |w| <= 0.9 and sign-aligned blocks of 5
    reg.harden(h)                             # compute with what the chip holds, h from 0 to 1
"""

from .discovery import trackable_weights
from .errors import CheckpointError, CheckpointWarning
from .functional import Penalties
from .layout import Layout
from .offline import check_state_dict, project_state_dict
from .parametrization import ChipConstraint, Settings
from .placement import Placement, Population, place
from .registry import AlreadyRegisteredError, Registry, register, registry_of
from .report import LayerReport, Report
from .spec import H1V1, H1V2, ChipSpec
from .state import plain_state_dict

__all__ = [
    "H1V1",
    "H1V2",
    "AlreadyRegisteredError",
    "CheckpointError",
    "CheckpointWarning",
    "ChipConstraint",
    "ChipSpec",
    "LayerReport",
    "Layout",
    "Penalties",
    "Placement",
    "Population",
    "Registry",
    "Report",
    "Settings",
    "check_state_dict",
    "place",
    "plain_state_dict",
    "project_state_dict",
    "register",
    "registry_of",
    "trackable_weights",
]
__version__ = "0.3.0"
