"""The nwave-param entry point itself: a shell over the Python API, its version, its usage errors,
``python -m nwave_param``, and what importing it loads.

Each command has its own tests (test_cli_check.py, test_cli_project.py, test_cli_demo.py), and so
have the files they read and write (test_files.py, test_outputs.py, test_sharing.py), the guards
on their process (test_guards.py) and hostile files (test_cli_hostile.py)."""

import json
import subprocess
import sys

import pytest
import torch
from commandline import run, usage_error
from layers import scaled
from torch import nn

import nwave_param as nwp
from nwave_param.checkpoints.cli import main
from nwave_param.functional import project


def test_the_command_line_is_a_shell_over_the_python_api(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    model = scaled(nn.Sequential(nn.Linear(6, 10), nn.Linear(10, 5)), 3.0)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    calls = []

    from nwave_param.checkpoints import offline  # what the commands call: the Python API's own functions

    def spy(name):
        real = getattr(offline, name)
        assert real is getattr(nwp, name)

        def call(state_dict, spec=None, **options):
            calls.append((name, spec, sorted(options)))
            return real(state_dict, spec, **options)

        monkeypatch.setattr(offline, name, call)

    spy("check_state_dict"), spy("project_state_dict")
    code, out, _ = run(capsys, "check", path, "--chip", "h1v2", "--json")
    assert code == 1 and calls == [("check_state_dict", nwp.H1V2, ["assume_plain", "exclude"])]
    assert json.loads(out)["rows"][0] == nwp.check_state_dict(torch.load(path), nwp.H1V2).to_dict()["rows"][0]
    calls.clear()
    code, _, _ = run(capsys, "project", path, "-o", tmp_path / "out.pt", "--bits", "4")
    assert code == 0 and [name for name, *_ in calls] == ["check_state_dict", "project_state_dict", "check_state_dict"]
    assert all(spec == nwp.ChipSpec(bits=4) for _, spec, _ in calls)  # --bits on top of the checkpoint's spec (none: H1v1)
    expected, _ = nwp.project_state_dict(torch.load(path), nwp.ChipSpec(bits=4))
    written = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(written) == list(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"nwave-param {nwp.__version__}"


def test_usage_errors_are_one_line(plain, capsys):
    assert "CHECKPOINT" in usage_error(capsys, "check")
    assert "-o/--output" in usage_error(capsys, "project", plain)
    line = usage_error(capsys, "check", plain, "--no-such\n\x1b[2Joption")
    assert "--no-such\\n\\x1b[2Joption" in line and "\x1b" not in line


@pytest.mark.slow
def test_console_entry_point(plain):
    result = subprocess.run(
        [sys.executable, "-m", "nwave_param", "check", "--json", str(plain), "--chip", "h1v1"], capture_output=True, text=True
    )
    assert result.returncode == 1 and json.loads(result.stdout)["mappable"] is False and result.stderr == ""


def test_importing_nwave_param_or_its_command_line_imports_no_torch():
    """The command line installs its signal handling before torch loads: nothing it imports first
    may import torch (or anything heavy)."""
    probe = (
        "import sys, nwave_param, nwave_param.checkpoints.cli\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'numpy', 'typing', 'argparse')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "[]\n", (result.stdout, result.stderr)


def test_every_public_name_is_imported_at_its_first_use_as_before():
    import importlib

    import nwave_param

    homes = {name: nwave_param._HOMES[name] for name in nwave_param.__all__}  # every name has a home, and only those
    assert set(nwave_param._HOMES) == set(nwave_param.__all__) and nwave_param.__version__ == "0.4.0"
    for name, home in homes.items():
        assert getattr(nwave_param, name) is getattr(importlib.import_module(f"nwave_param.{home}"), name), name
    from nwave_param import H1V2, register  # noqa: F401

    assert H1V2 is nwp.H1V2 and nwp.register is register
    assert nwave_param.functional.project is project and nwave_param.loss.__name__ == "nwave_param.loss"
    from nwave_param.loss import topology_loss, weight_magnitude_loss  # the vendor SDK's path: nwavesdk.loss

    assert (nwp.topology_loss, nwp.weight_magnitude_loss) == (topology_loss, weight_magnitude_loss)
    assert set(nwave_param.__all__) <= set(dir(nwave_param)) and "functional" in dir(nwave_param)
    with pytest.raises(AttributeError, match="module 'nwave_param' has no attribute 'nonsense'"):
        nwave_param.nonsense  # noqa: B018
