"""The user's model class of ``model_0_3.pt``: a network saved whole (``torch.save(model)``) with
nwave_param 0.3.0, holding the package's objects a pickle names by module path (``FrontEnd``,
``ChipSpec``, ``Layout``).  Written once by 0.3.0, never rewritten: later versions must load it."""

from torch import nn

import nwave_param as nwp


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.front = nwp.FrontEnd(4, gain=0.5)
        self.hidden = nn.Linear(4, 10)
        self.spec = nwp.H1V2.replace(bits=5)
        self.layout = nwp.Layout(inputs_first=True)

    def forward(self, x):
        return self.hidden(self.front(x))
