"""Quick start: a recurrent net trained with the chip penalties in the loss (synthetic data).

Run: python examples/quickstart.py
"""

import torch
from torch import nn

import nwave_param as nwp


class RecurrentNet(nn.Module):
    def __init__(self, inputs=8, hidden=40, classes=3):
        super().__init__()
        self.encode = nn.Linear(inputs, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x):  # x: (time, batch, inputs)
        h = torch.zeros(x.shape[1], self.recurrent.in_features)
        for x_t in x:  # reads self.recurrent.weight at every step: wrap in reg.cached()
            h = torch.tanh(self.encode(x_t) + self.recurrent(h))
        return self.readout(h)


def main():
    torch.manual_seed(0)
    x = torch.randn(12, 256, 8)
    y = (x.sum(0)[:, :3]).argmax(1)  # which of the first 3 inputs carried most signal
    model = RecurrentNet()
    with torch.no_grad():
        model.recurrent.weight.mul_(8)  # start far from the chip, as a pretrained net may

    reg = nwp.register(model, alpha=100.0, lam=10.0)  # the penalties are means over weights: scale them up
    print(f"tracking {reg.names}")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(301):
        with reg.cached():
            task = nn.functional.cross_entropy(model(x), y)
        loss = task + reg.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            p = reg.penalties()
            accuracy = (model(x).argmax(1) == y).float().mean().item()
            print(
                f"step {step:3d}  task {task.item():.3f}  accuracy {accuracy:.2f}  "
                f"magnitude {p.magnitude.item():.2e}  topology {p.topology.item():.2e}"
            )
    reg.remove()  # the plain model again, ready to save
    print(f"max |w| after training: {max(w.abs().max().item() for w in (model.encode.weight, model.recurrent.weight))}")


if __name__ == "__main__":
    main()
