"""The command line against hostile files: each attack ends in one line on stderr and exit 2,
and leaves no temporary file behind.

The attacks are small generated files (and factories), each run in-process.
"""

import os
import sys
import zipfile

import pytest
import torch
from torch import nn

from test_cli import error, leftovers

import nwave_param as nwp
from nwave_param.description import encode
from nwave_param.layout import Layout

MAX_BYTES = "1M"
FACTORIES = """
from torch import nn

def raises():
    raise ValueError("line one\\nline two \\x1b[31mred\\x1b[0m")

def raises_huge():
    raise ValueError("x" * 20_000_000)

def not_a_module():
    return "a string"
"""


def _zip_with_pickle(path, state, pickle_tail):
    """A torch zip checkpoint of ``state`` whose pickle gets ``pickle_tail`` as one more dict item."""
    torch.save(state, path)
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    assert entries[name].endswith(b"s.")  # the last SETITEM of the top dict, then STOP
    entries[name] = entries[name][:-1] + pickle_tail + b"."
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)


def _registered(spec=nwp.H1V1):
    model = nn.Sequential(nn.Linear(1, 4))
    nwp.register(model, spec)
    return model.state_dict()


def _build(name, directory):
    """The argv of attack ``name``, its files made in ``directory``; the phrase its error says."""
    at = lambda file: str(directory / file)  # noqa: E731
    limit = ["--max-bytes", MAX_BYTES]
    if name == "newline and escape sequence in a key":
        torch.save({"fc\n\x1b[2J\x1b[31m.weight": torch.zeros(3, 3, dtype=torch.int32)}, at("keys.pt"))
        return ["check", at("keys.pt"), *limit], "fc\\n\\x1b[2J\\x1b[31m.weight has dtype torch.int32"
    if name == "huge key":
        torch.save({"x" * 500_000 + ".weight": torch.zeros(3, 3, dtype=torch.int32)}, at("long.pt"))
        return ["check", at("long.pt"), *limit], "characters)…"
    if name == "newline in the input path":
        (directory / "bad\npath.pt").write_text("not a checkpoint\n")
        return ["check", at("bad\npath.pt"), *limit], "bad\\npath.pt: not a PyTorch or safetensors checkpoint"
    if name == "factory raises a multi-line message":
        return ["check", at("tiny.pt"), "--model", "hostile_factories:raises", *limit], "line one\\nline two \\x1b[31mred"
    if name == "factory raises a 20 MB message":
        return ["check", at("tiny.pt"), "--model", "hostile_factories:raises_huge", *limit], "characters)…"
    if name == "factory returns no module":
        return ["check", at("tiny.pt"), "--model", "hostile_factories:not_a_module", *limit], "returned str, not an nn.Module"
    if name == "a global that runs code":
        _zip_with_pickle(at("code.pt"), {"fc.weight": torch.ones(5, 3)}, b"X\x01\x00\x00\x00xcos\nsystem\nX\x04\x00\x00\x00echo\x85Rs")
        return ["check", at("code.pt"), *limit], "holds pickled Python objects"
    if name == "an unknown pickle opcode":
        _zip_with_pickle(at("opcode.pt"), {"fc.weight": torch.ones(5, 3)}, b"\x95s")
        return ["check", at("opcode.pt"), *limit], "not a readable PyTorch checkpoint (Unsupported operand 149)"
    if name == "specs with a huge value":
        state = _registered()
        state["0.parametrizations.weight.0._extra_state"] = encode(Layout(), nwp.ChipSpec(cores=(1,) * 20_000), 0.0)
        model = nn.Sequential(nn.Linear(1, 4), nn.Linear(4, 2))
        nwp.register(model[1:])
        state.update({f"1.{k}": v for k, v in model[1].state_dict().items()})
        torch.save(state, at("specs.pt"))
        return ["check", at("specs.pt"), *limit], "registered with different specs"
    raise KeyError(name)


ATTACKS = [
    "newline and escape sequence in a key",
    "huge key",
    "newline in the input path",
    "factory raises a multi-line message",
    "factory raises a 20 MB message",
    "factory returns no module",
    "a global that runs code",
    "an unknown pickle opcode",
    "specs with a huge value",
]


def _setting(directory):
    """The files every attack may use: a tiny valid checkpoint, the factories' module."""
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Linear(2, 3)).state_dict(), directory / "tiny.pt")
    (directory / "hostile_factories.py").write_text(FACTORIES)


@pytest.fixture
def hostile_dir(tmp_path, monkeypatch):
    _setting(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # the directory holds what the attack made, no more
    monkeypatch.delitem(sys.modules, "hostile_factories", raising=False)
    return tmp_path


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_ends_in_one_line_exit_2_and_leaves_nothing(attack, hostile_dir, capsys):
    argv, said = _build(attack, hostile_dir)
    before = set(os.listdir(hostile_dir))
    path, cwd = list(sys.path), os.getcwd()
    line = error(capsys, *argv)  # exit 2, nothing on stdout, one line on stderr
    assert "\x1b" not in line and "unexpected" not in line and said in line, line
    assert len(line) < 2500  # every piece from outside is cut
    assert leftovers(hostile_dir) == [] and set(os.listdir(hostile_dir)) == before
    assert sys.path == path and os.getcwd() == cwd
