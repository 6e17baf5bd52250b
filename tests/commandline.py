"""The command line run in-process, as the tests of each command run it, and the checkpoints they
feed it (tests/conftest.py makes the files the fixtures ``plain`` and ``mixed``)."""

import json
import os

import pytest
import torch
from layers import scaled
from torch import nn

import nwave_param as nwp
from nwave_param.checkpoints.cli import main

# The model of the issue: a grouped, a depthwise and a transposed convolution, an embedding.
MIXED_SOURCE = """
from torch import nn

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.grouped = nn.Conv1d(8, 8, 3, groups=4)
        self.depthwise = nn.Conv1d(8, 8, 3, groups=8)
        self.up = nn.ConvTranspose1d(8, 6, 3, groups=2)
        self.head = nn.Linear(6, 4)

def build():
    return Mixed()
"""
GUESSED = ("grouped.weight", "depthwise.weight", "up.weight")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error(capsys, *argv):
    """The one line of a failed run (exit 2, no traceback)."""
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err and out == "", (code, out, err)
    return lines[0]


def usage_error(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err


def leftovers(directory):
    return [name for name in os.listdir(directory) if name.startswith(".nwave-param")]


def load(path):
    return torch.load(path, weights_only=True)


def reset_scaled(model, factor, seed):
    """``model`` reinitialised from ``seed``, then scaled by ``factor``."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return scaled(model, factor)


def make_model():
    model = nn.Sequential(nn.Linear(4, 7), nn.LSTM(7, 6, num_layers=2, proj_size=3), nn.Linear(3, 6))
    return reset_scaled(model, 5, 0)


def mappable_mixed(mixed):
    """Mixed, projected in Python (exact layouts): mappable, its embedding far out of range."""
    model = reset_scaled(mixed.build(), 4, 0)
    reg = nwp.register(model)
    reg.project_()
    return model, reg


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)
