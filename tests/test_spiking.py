"""Spiking networks from snnTorch: tracked, trained and restored like any other model."""

from operator import attrgetter

import pytest
import torch
from installs import not_installed
from torch import nn

import nwave_param as nwp

snn = pytest.importorskip("snntorch", reason=not_installed("snntorch"))
surrogate = pytest.importorskip("snntorch.surrogate")


class SpikingNet(nn.Module):
    """Input Linear -> RLeaky with all-to-all recurrence -> readout, unrolled over time."""

    def __init__(self, inputs=8, hidden=12, classes=3):
        super().__init__()
        self.fc = nn.Linear(inputs, hidden)
        self.lif = snn.RLeaky(beta=0.9, linear_features=hidden, spike_grad=surrogate.fast_sigmoid())
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x):
        spk, mem = self.lif.init_rleaky()
        counts = 0
        for x_t in x:
            spk, mem = self.lif(self.fc(x_t), spk, mem)
            counts = counts + spk
        return self.readout(counts)


def test_rleaky_recurrent_weight_is_tracked_with_identical_outputs_and_gradients():
    torch.manual_seed(0)
    plain, registered = SpikingNet(), SpikingNet()
    registered.load_state_dict(plain.state_dict())
    x, y = torch.rand(6, 16, 8), torch.randint(0, 3, (16,))
    reg = nwp.register(registered)
    assert reg.names == ["fc.weight", "lif.recurrent.weight", "readout.weight"]

    nn.functional.cross_entropy(plain(x), y).backward()
    with reg.cached():
        nn.functional.cross_entropy(registered(x), y).backward()
    for name, param in plain.named_parameters():
        assert torch.equal(param.grad, attrgetter(name)(registered).grad), name


def test_penalty_drives_rleaky_weights_toward_the_chip_and_remove_restores_keys():
    torch.manual_seed(0)
    model = SpikingNet()
    with torch.no_grad():
        model.lif.recurrent.weight.mul_(10)
    keys = list(model.state_dict())
    reg = nwp.register(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    start = reg.penalty_terms()
    for _ in range(20):
        optimizer.zero_grad()
        reg.penalty().backward()
        optimizer.step()
    end = reg.penalty_terms()
    assert end.magnitude < start.magnitude and end.topology < start.topology
    reg.remove()
    assert list(model.state_dict()) == keys
