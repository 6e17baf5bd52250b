"""Run from outside the source tree against the installed wheel: the package works as users get it."""

import json
import os
import subprocess
import sys
import tempfile

import torch
from torch import nn

import nwave_param as nwp

assert "site-packages" in nwp.__file__, f"imported {nwp.__file__}, not the installed wheel"
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))
with torch.no_grad():
    for p in model.parameters():
        p.mul_(4)
reg = nwp.register(model)
penalty = reg.penalty()
penalty.backward()
assert torch.isfinite(penalty) and penalty > 0 and all(p.grad is not None for p in reg.latent_weights())
assert not reg.report().is_mappable
reg.harden(1.0).project_()
assert reg.is_mappable()
with tempfile.TemporaryDirectory() as directory:
    path = os.path.join(directory, "model.pt")
    torch.save(nwp.plain_state_dict(model), path)
    result = subprocess.run([sys.executable, "-m", "nwave_param", "check", path, "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mappable"] is True
    result = subprocess.run(["nwave-param", "check", path], capture_output=True, text=True)
    assert result.returncode == 0 and "mappable" in result.stdout, result.stderr
# the vowels data ships inside the wheel (package data), read as tensors only
import importlib.resources  # noqa: E402

with (importlib.resources.files("nwave_param.demo") / "data" / "japanese_vowels.pt").open("rb") as stream:
    vowels = torch.load(stream, weights_only=True)
assert {split: vowels[split]["labels"].numel() for split in ("train", "test")} == {"train": 270, "test": 370}
assert vowels["train"]["frames"].shape == (int(vowels["train"]["lengths"].sum()), 12)
print(f"wheel smoke check passed: nwave_param {nwp.__version__} from {os.path.dirname(nwp.__file__)}")
