"""register(example=...) reads every weight as the forward computes with it: orientation, gates,
groups, whatever the weight's name or module, through views, masks and parametrizations."""

import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from layers import assert_same_snapshot, snapshot
from torch import nn
from torch.nn.utils import parametrizations

import nwave_param as nwp
from nwave_param import functional
from nwave_param.core.trace import layouts_read, trace
from nwave_param.core.trace.synapses import kernel_reach

INPUTS_FIRST = nwp.Layout(inputs_first=True)


class Vendor(nn.Module):
    """Synapses in the chip vendor's convention, ``[N_in, N_out]`` used as ``x @ W``, beside a
    recurrent weight of another name and a torch Linear readout."""

    def __init__(self, inputs=16, hidden=100):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, hidden))
        self.W = nn.Parameter(torch.randn(hidden, hidden) * 0.1)
        self.readout = nn.Linear(hidden, 10)

    def forward(self, x):  # x: (time, batch, inputs)
        h = torch.zeros(x.shape[1], self.W.shape[0])
        for x_t in x:
            h = torch.tanh(x_t @ self.weight + h @ self.W)
        return self.readout(h)


def registered(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = nwp.register(model, **kwargs)
    return reg, [str(w.message) for w in caught if "jit" not in str(w.message)]


def test_a_vendor_convention_layer_is_read_inputs_first_and_projects_to_blocks_along_its_columns():
    torch.manual_seed(0)
    model = Vendor()
    reg, said = registered(model, example=torch.randn(5, 2, 16))
    assert reg.names == ["weight", "W", "readout.weight"] and not said
    assert reg.layouts == [INPUTS_FIRST, INPUTS_FIRST, nwp.Layout()]
    reg.project_()
    assert reg.is_mappable()
    for weight in reg.latent_weights()[:2]:  # in the true orientation: blocks of 5 output columns, one sign per input row
        blocks = weight.detach().view(weight.shape[0], -1, 5)
        assert not ((blocks > 0).any(-1) & (blocks < 0).any(-1)).any()


def test_stating_the_reading_by_hand_gives_the_same_registration():
    model = Vendor()
    reg, said = registered(model, layouts={"weight": INPUTS_FIRST, "W": INPUTS_FIRST})
    assert reg.names == ["weight", "W", "readout.weight"] and reg.layouts == [INPUTS_FIRST, INPUTS_FIRST, nwp.Layout()]
    assert not said


def test_without_an_example_a_bare_parameter_is_read_as_torch_reads_it_and_a_warning_says_so():
    reg, said = registered(Vendor())
    assert reg.names == ["weight", "readout.weight"] and reg.layouts == [nwp.Layout(), nwp.Layout()]
    assert any(message.startswith("not tracked, as their names are not a weight's: W;") for message in said)
    assert any(
        message.startswith("weight is a Parameter of Vendor, whose reading nwave_param does not know: read as [out, in]")
        and "layouts={'weight': nwp.Layout(inputs_first=True)}" in message and "example=x" in message
        for message in said
    )


class Readings(nn.Module):
    """One weight used in one of the ways the trace must read."""

    def __init__(self, way):
        super().__init__()
        self.way = way
        self.kernel = nn.Parameter(torch.randn(6, 4))  # [out, in] unless the way says otherwise
        self.diagonal = nn.Parameter(torch.ones(4, 4), requires_grad=False)

    def forward(self, x):  # x: (batch, 4)
        k = self.kernel
        return {
            "F.linear": lambda: nn.functional.linear(x, k),
            "x @ W.T": lambda: x @ k.T,
            "x @ W.t()": lambda: x @ k.t(),
            "W @ x.T": lambda: (k @ x.T).T,
            "torch.matmul": lambda: torch.matmul(x, k.transpose(0, 1)),
            "mm": lambda: torch.mm(x, k.permute(1, 0)),
            "einsum bi,oi->bo": lambda: torch.einsum("bi,oi->bo", x, k),
            "einsum io,bi": lambda: torch.einsum("bi,io->bo", x, k.T.contiguous()),
            "a masked weight": lambda: x @ (k.T * (torch.rand(4, 6) > -1)),
            "a reshaped weight": lambda: x @ k.reshape(6, 4).T.reshape(4, 6),
        }[self.way]()


@pytest.mark.parametrize(
    "way",
    [
        "F.linear", "x @ W.T", "x @ W.t()", "W @ x.T", "torch.matmul", "mm", "einsum bi,oi->bo", "einsum io,bi",
        "a masked weight", "a reshaped weight",
    ],
)
def test_the_output_dim_is_read_through_views_masks_and_every_way_of_writing_the_product(way):
    model = Readings(way)
    reg, said = registered(model, example=torch.randn(3, 4))
    assert reg.names == ["kernel"] and reg.layouts == [nwp.Layout()], (way, said)


def test_a_weight_read_two_ways_is_refused_naming_both_uses():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 5))

        def forward(self, x):
            return nn.functional.linear(x, self.weight) + x @ self.weight

    model = Twice()
    before = model.weight.detach().clone()
    with pytest.raises(
        ValueError,
        match=(
            r"^weight is read two ways: F\.linear\(x, weight\) in the model \(output neurons along dim 0\) "
            r"and x @ weight in the model \(output neurons along dim 1\)"
        ),
    ):
        nwp.register(model, example=torch.randn(2, 5))
    assert type(model) is Twice and torch.equal(model.weight, before)  # nothing registered


def test_a_stated_layout_that_contradicts_the_forward_is_refused():
    with pytest.raises(
        ValueError,
        match=r"^kernel: layouts states .*inputs_first=True.*but the forward reads it with Layout\(gates=1, groups=1, transposed=False\)",
    ):
        nwp.register(Readings("F.linear"), example=torch.randn(3, 4), layouts={"kernel": INPUTS_FIRST})


def test_weights_the_forward_never_uses_as_a_synapse_are_not_tracked_and_a_note_names_them():
    model = nn.ModuleDict({"used": nn.Linear(4, 6), "unused": nn.Linear(4, 6)})
    model.forward = lambda x: model["used"](x)
    reg, said = registered(model, example=torch.randn(2, 4))
    assert reg.names == ["used.weight"]
    assert "not used as a synapse by model(example), so not tracked: unused.weight" in said


@pytest.mark.parametrize(
    "layer, example, layout",
    [
        (nn.Conv2d(4, 6, 3, groups=2), torch.randn(1, 4, 5, 5), nwp.Layout(groups=2)),
        (nn.ConvTranspose1d(4, 6, 3, groups=2), torch.randn(1, 4, 5), nwp.Layout(groups=2, transposed=True)),
        (nn.GRU(3, 7), torch.randn(5, 2, 3), nwp.Layout(gates=3)),
        (nn.LSTMCell(3, 7), torch.randn(2, 3), nwp.Layout(gates=4)),
        (nn.RNN(3, 7), torch.randn(5, 2, 3), nwp.Layout()),
    ],
)
def test_convolutions_and_recurrent_layers_read_from_their_ops_agree_with_their_types(layer, example, layout):
    by_type = nwp.register(layer).layouts
    nwp.registry_of(layer).remove()
    assert nwp.register(layer, example=example).layouts == by_type == [layout] * len(by_type)


def test_a_parametrized_weight_and_a_registered_model_are_read_through_their_chains():
    layer = nn.Linear(4, 6)
    parametrizations.weight_norm(layer)
    assert nwp.register(layer, example=torch.randn(2, 4)).layouts == [nwp.Layout()]
    nwp.registry_of(layer).remove()
    vendor, example = Vendor(), torch.randn(5, 2, 16)
    nwp.register(vendor, example=example).harden(1.0)  # the forward now computes with the projections
    shapes = {name: tuple(p.shape) for name, p in [("weight", vendor.weight), ("W", vendor.W), ("readout.weight", vendor.readout.weight)]}
    read = layouts_read(trace(vendor, example, {}), shapes)
    assert {name: layout for name, (layout, _) in read.items()} == {
        "weight": INPUTS_FIRST, "W": INPUTS_FIRST, "readout.weight": nwp.Layout()
    }


@settings(max_examples=50, deadline=None)
@given(inputs=st.integers(1, 12), outputs=st.integers(1, 12), inputs_first=st.booleans(), seed=st.integers(0, 2**16))
def test_a_registered_vendor_weight_is_hardened_as_the_definition_reads_its_transpose(inputs, outputs, inputs_first, seed):
    generator = torch.Generator().manual_seed(seed)
    shape = (inputs, outputs) if inputs_first else (outputs, inputs)
    weight = torch.randn(shape, generator=generator) * 2
    layout = nwp.Layout(inputs_first=inputs_first)
    projected = functional.project(weight, layout, nwp.H1V2)
    as_torch = functional.project(weight.t().contiguous(), nwp.Layout(), nwp.H1V2).t() if inputs_first else projected
    assert torch.equal(projected, as_torch)  # inputs first is the transpose, read as torch reads it


def test_the_command_line_reads_a_vendor_convention_checkpoint_in_its_true_orientation(tmp_path, capsys):
    import json

    from nwave_param.checkpoints import cli

    torch.manual_seed(0)
    model = Vendor()
    reg = nwp.register(model, nwp.H1V2, example=torch.randn(5, 2, 16))
    torch.save(model.state_dict(), tmp_path / "vendor.pt")
    assert cli.main(["check", str(tmp_path / "vendor.pt"), "--json"]) == 1
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["weight"]["inputs_first"] is True and rows["weight"]["layout"] == "exact"
    assert rows["readout.weight"]["inputs_first"] is False
    assert cli.main(["project", str(tmp_path / "vendor.pt"), "-o", str(tmp_path / "chip.pt")]) == 0
    projected = torch.load(tmp_path / "chip.pt", weights_only=True)
    reg.project_()
    for key, value in model.state_dict().items():
        if key.endswith(".original"):
            assert torch.equal(projected[key], value), key  # the command line projects as the model does
    weight = projected["parametrizations.weight.original"]
    blocks = weight.view(16, -1, 5)  # blocks of 5 output columns: one sign per input row
    assert not ((blocks > 0).any(-1) & (blocks < 0).any(-1)).any()
    assert nwp.check_state_dict(projected).is_mappable


def test_a_weight_behind_a_parametrization_that_multiplies_by_a_buffer_is_read_as_its_module_reads_it():
    layer = parametrizations.orthogonal(nn.Linear(6, 6, bias=False))  # its forward computes base @ Q: no activation
    reg, said = registered(layer, example=torch.randn(2, 6))
    assert reg.layouts == [nwp.Layout()] and not said


def test_a_synapse_read_without_an_orientation_is_tracked_and_a_warning_says_so():
    class Summed(nn.Module):  # x W written as a broadcast product and a sum
        def __init__(self):
            super().__init__()
            self.fc, self.W = nn.Linear(16, 16), nn.Parameter(torch.randn(16, 100))

        def forward(self, x):
            return (self.fc(x).unsqueeze(-1) * self.W).sum(-2)

    reg, said = registered(Summed(), example=torch.randn(4, 16))
    assert sorted(reg.names) == ["W", "fc.weight"]
    assert said == [
        "W: the forward reads it through mul(...) in the model (output neurons along no single dim), which does not say which dim "
        "indexes the output neurons; read as Layout(gates=1, groups=1, transposed=False); state it with layouts={'W': nwp.Layout(...)}"
    ]


def test_a_weight_split_between_two_uses_is_said_in_a_warning():
    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(30, 16))

        def forward(self, x):
            first, second = self.weight.split([12, 18], 0)
            return nn.functional.linear(x, first), nn.functional.linear(x, second)

    _, said = registered(Fused(), example=torch.randn(4, 16))
    assert said == [
        "weight: the forward uses 12 of its 30 output rows in F.linear(x, weight) in the model: nwave_param cuts its blocks of "
        "output neurons from its first row, so a part that starts elsewhere may share a block with another; "
        "give each part a weight of its own"
    ]


def test_a_reading_no_layout_states_is_said_so():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(torch.randn(1, 16, 100))

        def forward(self, x):
            return x @ self.W[0]

    _, said = registered(Odd(), example=torch.randn(2, 16))
    assert said == [
        "W: the forward reads it through x @ weight in the model (output neurons along dim 2), which no Layout states; read as "
        "Layout(gates=1, groups=1, transposed=False), so its blocks are not the forward's: store it as [out, in] or [in, out]"
    ]


def test_names_stay_on_one_line_in_errors_and_warnings():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("evil\nname", nn.Linear(5, 5))

        def forward(self, x):
            layer = getattr(self, "evil\nname")
            return layer(x) + x @ layer.weight

    with pytest.raises(ValueError, match="read two ways") as raised:
        nwp.register(Twice(), example=torch.randn(2, 5))
    assert "\n" not in str(raised.value)


def test_a_compiled_model_is_refused_saying_to_register_before_compiling():
    with pytest.raises(TypeError, match=r"register the model before torch.compile"):
        nwp.register(torch.compile(nn.Linear(4, 5)))


class Sideways(nn.Module):
    """A forward that writes everything it can reach: weights through .data, a list, a
    generator, Python's and numpy's random states, a requires_grad flag."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.history = []
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x):
        import random

        import numpy

        self.fc.weight.data = self.fc.weight.data * 2
        self.fc.bias.requires_grad_(False)
        self.history.append(len(self.history))
        random.random(), numpy.random.rand(), torch.rand(1, generator=self.generator), torch.rand(1)
        return self.fc(x)


def test_the_trace_leaves_the_model_and_every_random_state_as_they_were():
    import random

    import numpy

    model, example = Sideways(), torch.randn(2, 4)
    before = snapshot(model)
    states = (random.getstate(), numpy.random.get_state()[1].copy(), torch.get_rng_state(), model.generator.get_state())
    trace(model, example, {})
    assert_same_snapshot(before, snapshot(model))
    assert model.fc.bias.requires_grad and model.history == []
    assert random.getstate() == states[0] and (numpy.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2]) and torch.equal(model.generator.get_state(), states[3])


def test_a_vendor_checkpoint_is_read_in_its_true_orientation_with_its_model_or_with_layouts():
    class Plain(nn.Module):  # the vendor's synapses, x @ W, with no nwave_param anywhere
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 100))
            self.readout = nn.Linear(100, 10)

        def forward(self, x):
            return self.readout(x @ self.weight)

    torch.manual_seed(0)
    saved_from = Plain()
    nwp.register(saved_from, nwp.H1V2, example=torch.randn(2, 16))
    described = saved_from.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in (saved_from, Plain()):  # registered from its forward, or fresh: the description says the reading
            report = nwp.check_state_dict(described, model=model)
            assert [(row.name, row.layout) for row in report.rows] == [("weight", INPUTS_FIRST), ("readout.weight", nwp.Layout())]
    plain = Plain().state_dict()
    projected, _ = nwp.project_state_dict(plain, nwp.H1V2, layouts={"weight": INPUTS_FIRST})
    blocks = projected["weight"].view(16, -1, 5)  # blocks of 5 output columns, one sign per input row
    assert not ((blocks > 0).any(-1) & (blocks < 0).any(-1)).any()
    assert nwp.check_state_dict(projected, nwp.H1V2, layouts={"weight": INPUTS_FIRST}).is_mappable
    with pytest.raises(nwp.errors.CheckpointError, match=r"^weight: layouts states .* but .* describes"):
        nwp.check_state_dict(described, layouts={"weight": nwp.Layout()})


def test_a_neurons_own_recurrent_weight_is_read_from_the_trace():
    snn = pytest.importorskip("snntorch", reason="snnTorch's RLeaky")
    net = nn.Sequential(
        snn.Leaky(beta=0.9, init_hidden=True), nn.Linear(16, 20), snn.RLeaky(beta=0.9, linear_features=20, init_hidden=True)
    )
    reg, said = registered(net, example=torch.rand(3, 2, 16))
    assert reg.names == ["1.weight", "2.recurrent.weight"] and not said


def test_layouts_add_to_a_registered_models_layouts_and_may_not_contradict_them():
    class Vendor(nn.Module):
        def __init__(self):
            super().__init__()
            self.W, self.readout = nn.Parameter(torch.randn(16, 100)), nn.Linear(100, 10)

        def forward(self, x):
            return self.readout(x @ self.W)

    plain = Vendor().state_dict()
    model = Vendor()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nwp.register(model, nwp.H1V2)  # without an example: W not tracked
        report = nwp.check_state_dict(plain, nwp.H1V2, model=model, layouts={"W": INPUTS_FIRST})
        assert [(row.name, row.layout) for row in report.rows] == [("W", INPUTS_FIRST), ("readout.weight", nwp.Layout())]
        with pytest.raises(
            nwp.errors.CheckpointError, match=r"^readout.weight: layouts states .* but the model's registration reads it with"
        ):
            nwp.check_state_dict(plain, nwp.H1V2, model=model, layouts={"readout.weight": INPUTS_FIRST})


@settings(max_examples=150, deadline=None)
@given(dims=st.integers(1, 3), transposed=st.booleans(), as_ints=st.booleans(), named_padding=st.booleans(), data=st.data())
def test_kernel_reach_counts_the_output_positions_one_input_reaches(dims, transposed, as_ints, named_padding, data):
    """``kernel_reach`` against the plain count: each input position alone, through a kernel of
    ones, and the output positions it lights; strides, dilations and paddings as ints or per dim,
    and ``"same"`` and ``"valid"``."""
    draw = lambda strategy: data.draw(strategy)  # noqa: E731
    kernel, stride, dilation, length = (draw(st.lists(st.integers(low, high), min_size=dims, max_size=dims))
                                        for low, high in ((1, 4), (1, 3), (1, 3), (1, 5)))
    if as_ints:  # one value for every dim, as torch takes it
        stride, dilation = [stride[0]] * dims, [dilation[0]] * dims
    padding = [draw(st.integers(0, d * (k - 1))) for k, d in zip(kernel, dilation)]
    given_padding = padding[0] if as_ints and len(set(padding)) == 1 else padding
    if named_padding and not transposed:
        stride = [1] * dims  # torch takes "same" with stride 1 only
        given_padding = draw(st.sampled_from(["same", "valid"]))
    convolution = getattr(torch.nn.functional, f"conv{'_transpose' if transposed else ''}{dims}d")
    ones = torch.ones(1, 1, *kernel)
    stride_given = stride[0] if as_ints else stride
    dilation_given = dilation[0] if as_ints else dilation
    keywords = {"stride": stride_given, "padding": given_padding, "dilation": dilation_given}
    try:
        outputs = convolution(torch.zeros(1, 1, *length), ones, **keywords).shape[2:]
    except RuntimeError:  # a kernel past the padded input
        outputs = torch.Size([0])
    assume(outputs.numel() > 0)
    alone = torch.eye(torch.Size(length).numel()).reshape(-1, 1, *length)  # each input position alone, one per batch entry
    plain = int(convolution(alone, ones, **keywords).flatten(1).count_nonzero(1).max())
    reach = kernel_reach(transposed, length, outputs, kernel, stride_given, given_padding, dilation_given)
    assert reach == plain


@settings(max_examples=100, deadline=None)
@given(transposed=st.booleans(), kernel=st.integers(1, 9), stride=st.integers(1, 7), dilation=st.integers(1, 6),
       length=st.integers(1, 80), data=st.data())
def test_kernel_reach_along_a_long_dim_counts_what_each_input_alone_lights(transposed, kernel, stride, dilation, length, data):
    """The count along one long dim, where its windows' edges and its stride and dilation
    residues all show, against the plain count of each input position alone."""
    padding = data.draw(st.integers(0, dilation * (kernel - 1)))
    convolution = torch.nn.functional.conv_transpose1d if transposed else torch.nn.functional.conv1d
    ones, keywords = torch.ones(1, 1, kernel), {"stride": stride, "padding": padding, "dilation": dilation}
    try:
        outputs = convolution(torch.zeros(1, 1, length), ones, **keywords).shape[2:]
    except RuntimeError:  # a kernel past the padded input
        outputs = torch.Size([0])
    assume(outputs.numel() > 0)
    plain = int(convolution(torch.eye(length).reshape(length, 1, length), ones, **keywords).flatten(1).count_nonzero(1).max())
    assert kernel_reach(transposed, [length], outputs, [kernel], stride, padding, dilation) == plain
