"""ChipSpec: the presets carry the chip's capacity, every field is validated at construction, and
``replace`` derives a spec keeping the rest."""

import pytest

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


def test_the_capacity_decides_no_weights_value():
    assert nwp.ChipSpec(limit=1.66).essentials == nwp.H1V2.essentials
    assert nwp.ChipSpec(bits=5).essentials != nwp.H1V1.essentials


@pytest.mark.parametrize("limit", [0, -1.0, float("inf"), float("nan"), "0.9", True])
def test_chipspec_rejects_bad_limit(limit):
    with pytest.raises(ValueError, match="limit"):
        nwp.ChipSpec(limit=limit)


@pytest.mark.parametrize("size", [0, -5, 2.5, True, "5"])
def test_chipspec_rejects_bad_group_size(size):
    with pytest.raises(ValueError, match="group_size"):
        nwp.ChipSpec(group_size=size)


def test_chipspec_is_frozen_with_chip_defaults():
    spec = nwp.ChipSpec()
    assert (spec.limit, spec.group_size) == (0.9, 5)
    with pytest.raises(AttributeError):
        spec.limit = 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [({"bits": 1}, "bits"), ({"bits": 17}, "bits"), ({"bits": 4.0}, "bits"), ({"bits": True}, "bits"),
     ({"mismatch": -0.1}, "mismatch"), ({"mismatch": float("nan")}, "mismatch"), ({"mismatch": "0.1"}, "mismatch")],
)
def test_chipspec_validates_bits_and_mismatch(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nwp.ChipSpec(**kwargs)


def test_chip_presets_and_repr():
    assert (nwp.H1V1.limit, nwp.H1V1.group_size, nwp.H1V1.bits, nwp.H1V1.mismatch) == (0.9, 5, None, 0.0)
    assert (nwp.H1V2.limit, nwp.H1V2.group_size, nwp.H1V2.bits, nwp.H1V2.mismatch) == (1.66, 5, None, 0.0)
    assert nwp.ChipSpec() == nwp.H1V1 and repr(nwp.H1V1) == "ChipSpec(limit=0.9, group_size=5)"
    spec = nwp.H1V2.replace(bits=5, mismatch=0.02)
    assert eval(repr(spec), {"ChipSpec": nwp.ChipSpec}) == spec


def test_replace_derives_a_spec_keeping_the_rest():
    derived = nwp.H1V2.replace(bits=5, mismatch=0.02)
    assert derived.cores == (50, 50, 100) and derived.limit == 1.66 and derived.reset == "subtract"
    assert (derived.bits, derived.mismatch) == (5, 0.02) and nwp.H1V2.bits is None  # the preset is left as it is
    with pytest.raises(ValueError, match="bits must be an int in"):
        nwp.H1V2.replace(bits=1)
    with pytest.raises(TypeError, match="no field 'bit'"):
        nwp.H1V2.replace(bit=5)
