"""A weight's description in a checkpoint (nwave_param.description): decoded to what was encoded,
even cast to float or blended with itself, damaged ones refused, never misread, read with tensor
ops until it is known good."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import nwave_param as nwp
from nwave_param import description
from nwave_param.layout import Layout

layouts = st.one_of(
    st.builds(Layout, gates=st.sampled_from([1, 3, 4]), groups=st.integers(1, 2**40), transposed=st.booleans()),
    st.builds(Layout, gates=st.sampled_from([1, 3, 4]), inputs_first=st.just(True)),
)
specs = st.builds(
    nwp.ChipSpec,
    limit=st.floats(1e-30, 1e30),
    group_size=st.integers(1, 2**40),
    bits=st.one_of(st.none(), st.integers(2, 16)),
    mismatch=st.floats(0, 1e30),
    cores=st.lists(st.integers(1, 2**40), min_size=1, max_size=9).map(tuple),
    inputs=st.integers(1, 2**40),
    reset=st.sampled_from(["subtract", "zero", None]),
)


@given(
    layout=layouts, spec=specs, hardness=st.floats(0, 1), dtype=st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64])
)
def test_a_description_decodes_to_what_was_encoded_even_cast_to_float(layout, spec, hardness, dtype):
    saved = description.encode(layout, spec, hardness)
    assert saved.dtype == torch.int64 and saved.dim() == 1
    assert description.decode(saved.to(dtype)) == (layout, spec, hardness)


@given(layout=layouts, spec=specs, hardness=st.floats(0, 1), data=st.data())
def test_a_damaged_description_is_refused_never_misread(layout, spec, hardness, data):
    saved = description.encode(layout, spec, hardness)
    where = data.draw(st.integers(0, saved.numel() - 1), label="word")
    damaged = saved.clone()
    damaged[where] = (damaged[where] + data.draw(st.integers(1, 2**17 - 1), label="by")) % 2**17
    same_word = damaged[where] // 2 == saved[where] // 2  # 2 w and 2 w + 1 hold the same word w
    assert description.decode(damaged) == ((layout, spec, hardness) if same_word else None)
    assert description.decode(saved[:-1]) is None and description.decode(torch.cat([saved, saved[:1]])) is None
    averaged = 0.999 * saved.double() + 0.001 * torch.zeros_like(saved.double())  # an EMA of everything
    assert description.decode(averaged) is None or description.decode(averaged) == (layout, spec, hardness)


def test_a_description_is_read_with_tensor_ops_until_its_magic_length_and_crc_hold(monkeypatch):
    """No word of a tensor becomes a Python object before the record is known good: a huge
    garbage description costs a few passes over its words, never a Python int per word."""
    saved = description.encode(Layout(gates=4), nwp.ChipSpec(cores=(7,) * 1000), 0.5)
    bad_crc, bad_magic = saved.clone(), saved.clone()
    bad_crc[-1] ^= 2  # a stored 2 w + 1: 2 changes its word w
    bad_magic[0] ^= 2
    longer = torch.cat([saved, torch.zeros(10**6, dtype=torch.int64)])  # longer than its head's core count says

    def per_word(*_):
        raise AssertionError("a word became a Python object")

    monkeypatch.setattr(torch.Tensor, "tolist", per_word)
    monkeypatch.setattr(torch.Tensor, "__iter__", per_word)
    for dtype in (torch.int64, torch.int32, torch.float64):
        for garbage in (bad_crc, bad_magic, longer):
            assert description.decode(garbage.to(dtype)) is None
        assert description.decode(saved.to(dtype)) == (Layout(gates=4), nwp.ChipSpec(cores=(7,) * 1000), 0.5)


@settings(max_examples=200)
@given(
    layout=layouts,
    spec=specs,
    hardness=st.floats(0, 1),
    decay=st.one_of(st.floats(0, 1), st.sampled_from([0.9, 0.99, 0.999, 0.9998, 0.9999, 0.99999])),
)
def test_a_description_blended_with_itself_in_float_reads_the_same(layout, spec, hardness, decay):
    """timm's ModelEmaV2 over a snapshot dict, ``e.copy_(d * e + (1 - d) * m)``, computes in
    float32 and truncates back into int64; the words 2 w + 1 survive it, whatever the decay."""
    saved = description.encode(layout, spec, hardness)
    ema = saved.clone()
    ema.copy_(decay * ema + (1.0 - decay) * saved)
    assert description.decode(ema) == (layout, spec, hardness)
    assert description.decode(decay * saved.double() + (1 - decay) * saved.double()) == (layout, spec, hardness)


def test_a_description_cast_to_half_precision_is_refused():
    saved = description.encode(Layout(), nwp.H1V2, 0.5)
    assert description.decode(saved.half()) is None and description.decode(saved.bfloat16()) is None


def test_the_largest_spec_a_description_holds_is_saved_and_read_back():
    spec = nwp.ChipSpec(group_size=2**64 - 1, cores=(2**64 - 1, 1), inputs=2**64 - 1)
    model = nn.Linear(3, 2)
    nwp.register(model, spec)
    state = model.state_dict()
    assert nwp.check_state_dict(state).spec == spec
