"""nwave_param: train PyTorch models that fit the Neuronova neuromorphic chip.

::

    import nwave_param as nwp
    reg = nwp.register(model)                         # track every weight; the model computes as before
    schedule = nwp.Schedule(reg, total_steps, optimizer)   # the recipe: penalty, hardness, learning rate
    loss = task_loss + schedule.penalty()             # steer toward |w| <= 0.9 and sign-aligned blocks of 5
    schedule.step()                                   # after each optimizer step: the network ends computing
                                                      # with what the chip holds

Every name is imported when first used (PEP 562), so that ``import nwave_param`` imports no
torch: the command line installs its signal handling before torch loads, and an interrupt while
torch is still importing ends in one line (:mod:`nwave_param.checkpoints.cli`).
"""

import importlib
import importlib.util

# each public name -> the module that defines it
_HOMES = {
    "trackable_weights": "core.discovery",
    "CheckpointError": "errors",
    "CheckpointWarning": "errors",
    "PenaltyTerms": "functional",
    "Layout": "layout",
    "check_state_dict": "checkpoints.offline",
    "project_state_dict": "checkpoints.offline",
    "ChipConstraint": "core.parametrization",
    "RegistrationSettings": "core.settings",
    "Placement": "placement",
    "Population": "placement",
    "place": "placement",
    "Regrouping": "placement",
    "regroup_": "placement",
    "AlreadyRegisteredError": "core.registry",
    "Registry": "core.registry",
    "register": "core.registry",
    "registry_of": "core.registry",
    "WeightReport": "core.report",
    "Report": "core.report",
    "H1V1": "spec",
    "H1V2": "spec",
    "ChipSpec": "spec",
    "plain_state_dict": "core.state",
    "Schedule": "core.schedule",
    "FrontEnd": "blocks",
    "ChipLeaky": "blocks",
    "ChipRLeaky": "blocks",
    "weight_magnitude_loss": "core.loss",
    "topology_loss": "core.loss",
    "settling": "core.schedule",
}

__all__ = [
    "H1V1",
    "H1V2",
    "AlreadyRegisteredError",
    "CheckpointError",
    "ChipLeaky",
    "ChipRLeaky",
    "CheckpointWarning",
    "ChipConstraint",
    "ChipSpec",
    "FrontEnd",
    "WeightReport",
    "Layout",
    "PenaltyTerms",
    "Placement",
    "Population",
    "Registry",
    "Regrouping",
    "Report",
    "Schedule",
    "RegistrationSettings",
    "check_state_dict",
    "place",
    "plain_state_dict",
    "project_state_dict",
    "regroup_",
    "register",
    "registry_of",
    "settling",
    "topology_loss",
    "weight_magnitude_loss",
    "trackable_weights",
]
__version__ = "0.4.0"


# 0.3's names, deprecated for one release (removed in 0.5): each -> its new name
_RENAMED = {"Penalties": "PenaltyTerms", "LayerReport": "WeightReport", "Settings": "RegistrationSettings"}


def __getattr__(name: str) -> object:
    """A public name, or a submodule (``nwave_param.functional``), imported at its first use."""
    if name in _RENAMED:
        import warnings

        warnings.warn(f"nwp.{name} is deprecated: it is nwp.{_RENAMED[name]} (the old name goes in 0.5)", DeprecationWarning, stacklevel=2)
        return __getattr__(_RENAMED[name])  # not cached: every use warns
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # found once: the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
