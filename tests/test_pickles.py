"""Networks saved whole (``torch.save(model)``, a pickle): what 0.3.0 wrote loads, and the chip's
own building blocks pickle and unpickle."""

import io
import pathlib

import pytest
import torch
from torch import nn

import nwave_param as nwp
from nwave_param.functional import project

DATA = pathlib.Path(__file__).parent / "data"


def test_a_network_pickled_whole_by_0_3_loads_with_its_package_objects(monkeypatch):
    monkeypatch.syspath_prepend(str(DATA))  # the user's own class, model_0_3.Net
    model = torch.load(DATA / "model_0_3.pt", weights_only=False)
    assert type(model.front) is nwp.FrontEnd and model.front.channels == 4
    assert model.spec == nwp.H1V2.replace(bits=5) and model.layout == nwp.Layout(inputs_first=True)
    # as 0.3 saved it: gains of 0.5, projected onto the 5-bit grid, then squashed into the plain Parameter
    expected = project(torch.full((4, 1, 1), 0.5), nwp.Layout(groups=4), model.spec)
    assert torch.equal(model.front.weight, expected) and not torch.equal(expected, torch.full((4, 1, 1), 0.5))
    x = torch.rand(3, 4)
    assert torch.equal(model(x), model.hidden(x * expected.flatten()))
    reg = nwp.register(model, model.spec)  # and it registers as any network does
    assert reg.is_mappable()


def test_chip_neurons_pickled_whole_by_0_4_load_as_the_classes_they_are_now():
    """0.4 pickled its chip neurons under the names ``_ChipLeaky`` and ``_ChipRLeaky``; the classes
    are ``ChipLeaky`` and ``ChipRLeaky`` since, and those names still find them."""
    snn = pytest.importorskip("snntorch", reason="the chip neurons are snnTorch neurons: pip install snntorch")
    model = torch.load(DATA / "model_0_4.pt", weights_only=False)  # FrontEnd(3), ChipLeaky, Linear(3, 4), ChipRLeaky
    assert type(model[1]) is nwp.ChipLeaky and type(model[3]) is nwp.ChipRLeaky and isinstance(model[3], snn.RLeaky)
    x = torch.tensor([[-3.0, 0.5, 2.0]])
    spikes = model[1](model[0](x))  # init_hidden: the membrane kept in .mem
    assert torch.equal(model[1].mem, (0.5 * x).clamp(min=0)) and torch.equal(spikes, torch.zeros_like(x))
    model(x)  # the recurrent population runs as the chip's too
    assert float(model[3].mem.min()) >= 0


@pytest.mark.parametrize("make", ["ChipLeaky", "ChipRLeaky"])
def test_a_network_of_chip_neurons_pickles_whole(make):
    surrogate = pytest.importorskip("snntorch.surrogate", reason="the chip neurons are snnTorch neurons: pip install snntorch")
    kwargs = {"linear_features": 3} if make == "ChipRLeaky" else {}
    # snnTorch's default surrogate is a closure, which no pickle holds; a surrogate class's apply is one
    neuron = getattr(nwp, make)(0.8, init_hidden=True, spike_grad=surrogate.StraightThroughEstimator.apply, **kwargs)
    model = nn.Sequential(nwp.FrontEnd(3), neuron)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copy = torch.load(buffer, weights_only=False)
    assert type(copy[1]) is type(model[1]) and type(copy[1]).__name__ == make
    assert type(copy[1]).__module__ == "nwave_param.blocks"
    x = torch.tensor([[-3.0, 0.5, 2.0]])
    assert all(torch.equal(a, b) for a, b in zip(model(x), copy(x)))  # the same neurons, the membrane clamped alike
    assert float(copy[1].mem.min()) >= 0
