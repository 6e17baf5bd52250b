"""Quick start: train a recurrent net on the chip, then deploy it with nothing lost (synthetic data).

Run: python examples/quickstart.py

The recipe: register, train with ``nwp.Schedule``'s rule (the penalty's scale rising over the first
half, the hardness rising to 1 between 10% and 40%, the learning rate falling to 0 over the last
40%), then project, check and save.  The same network trained without constraints, with the same
learning-rate decay, is printed beside it.
"""

import os
import tempfile

import torch
from torch import nn

import nwave_param as nwp
from nwave_param.core.schedule import settling

STEPS = 300


class RecurrentNet(nn.Module):
    def __init__(self, inputs=8, hidden=40, classes=3):
        super().__init__()
        self.encode = nn.Linear(inputs, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x):  # x: (time, batch, inputs)
        h = torch.zeros(x.shape[1], self.recurrent.in_features)
        for x_t in x:  # reads self.recurrent.weight at every step: wrap the forward in reg.cached()
            h = torch.tanh(self.encode(x_t) + self.recurrent(h))
        return self.readout(h)


def task(seed):
    """Which of the first 3 inputs carried the most signal over 12 time steps."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 2048, 8, generator=generator)
    return x, x.sum(0)[:, :3].argmax(1)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train(model, x, y, reg=None):
    """The rule (``nwp.Schedule``'s defaults) with ``reg``; without, the same learning-rate decay alone."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    if reg is None:  # the rule's learning-rate decay alone: the comparison measures the chip alone
        decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: settling(step, STEPS))
    else:
        schedule = nwp.Schedule(reg, STEPS, optimizer)  # the hardness, the penalty's scale and the learning rate
    for _ in range(STEPS):
        if reg is not None and schedule.steps == schedule.regroup_step:  # once: this tanh net has no spiking populations to regroup
            nwp.regroup_(model, x, optimizer)
        with reg.cached() if reg is not None else torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y)
            if reg is not None:
                loss = loss + schedule.penalty()  # it steers the latent weights toward the chip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if reg is None:
            decay.step()
        else:
            schedule.step()


def main():
    torch.manual_seed(0)
    (x, y), (x_test, y_test) = task(1), task(2)
    start = RecurrentNet()

    unconstrained = RecurrentNet()
    unconstrained.load_state_dict(start.state_dict())
    train(unconstrained, x, y)

    model = RecurrentNet()
    model.load_state_dict(start.state_dict())
    reg = nwp.register(model)  # nwp.H1V1 (limit 0.9, blocks of 5); nwp.H1V2 for the H1v2 chip
    train(model, x, y, reg)
    trained = accuracy(model, x_test, y_test)  # computed with what the chip holds (hardness 1)

    print(reg.report())  # the latent weights: not yet what the chip holds
    reg.project_()  # now they are: the network computed with these values already
    assert reg.is_mappable()
    deployed = accuracy(model, x_test, y_test)
    assert deployed == trained

    path = os.path.join(tempfile.mkdtemp(), "model.pt")
    torch.save(nwp.plain_state_dict(model), path)  # keys a plain RecurrentNet loads
    plain = RecurrentNet()
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert accuracy(plain, x_test, y_test) == deployed

    print(f"\ntest accuracy: unconstrained {100 * accuracy(unconstrained, x_test, y_test):.1f}%, "
          f"on the chip {100 * deployed:.1f}% (as trained {100 * trained:.1f}%), saved {path}")


if __name__ == "__main__":
    main()
