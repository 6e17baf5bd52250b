"""ChipSpec: the presets carry the chip's capacity, every field is validated at construction."""

import pytest
from torch import nn

import nwave_param as nwp


def test_the_presets_are_the_vendors_chips_and_the_default_is_h1v1():
    assert nwp.H1V1 == nwp.ChipSpec(limit=0.9, group_size=5, cores=(64, 64, 64, 64), inputs=16, reset="zero") == nwp.ChipSpec()
    assert nwp.H1V2 == nwp.ChipSpec(limit=1.66, group_size=5, cores=(50, 50, 100), inputs=16, reset="subtract")
    assert repr(nwp.H1V1) == "ChipSpec(limit=0.9, group_size=5)"  # the reprs of the first release still hold
    assert repr(nwp.H1V2) == "ChipSpec(limit=1.66, group_size=5, cores=(50, 50, 100), reset='subtract')"
    assert nwp.ChipSpec(cores=[8, 4]).cores == (8, 4)  # a list is held as a tuple: the spec stays hashable
    assert nwp.H1V2.to_dict() == {
        "limit": 1.66, "group_size": 5, "bits": None, "mismatch": 0.0, "cores": [50, 50, 100], "inputs": 16, "reset": "subtract"
    }
    with pytest.raises(ValueError, match=r"^ChipSpec: reset must be one of 'subtract', 'zero', None, got 'soft'"):
        nwp.ChipSpec(reset="soft")


@pytest.mark.parametrize(
    "kwargs, field",
    [({"cores": ()}, "cores"), ({"cores": (64, 0)}, "cores"), ({"cores": (64.0,)}, "cores"), ({"cores": (True,)}, "cores"),
     ({"cores": 64}, "cores"), ({"cores": "64"}, "cores"), ({"inputs": 0}, "inputs"), ({"inputs": 16.0}, "inputs"),
     ({"inputs": True}, "inputs"), ({"cores": (2**64,)}, "cores"), ({"inputs": 2**64}, "inputs"), ({"group_size": 2**64}, "group_size")],
)
def test_cores_and_inputs_are_validated_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^ChipSpec: {field} must be"):
        nwp.ChipSpec(**kwargs)


def test_the_largest_spec_a_description_holds_is_saved_and_read_back():
    spec = nwp.ChipSpec(group_size=2**64 - 1, cores=(2**64 - 1, 1), inputs=2**64 - 1)
    model = nn.Linear(3, 2)
    nwp.register(model, spec)
    state = model.state_dict()
    assert nwp.check_state_dict(state).spec == spec


def test_the_capacity_decides_no_weights_value():
    assert nwp.ChipSpec(limit=1.66).essentials == nwp.H1V2.essentials
    assert nwp.ChipSpec(bits=5).essentials != nwp.H1V1.essentials
