"""The command line's guards on its process (nwave_param.checkpoints.guards): the user's ``--model``
code prints to stderr and its moves are undone; a closed stdout keeps the exit status."""

import os
import signal
import subprocess
import sys
import weakref

import pytest
import torch
from commandline import leftovers, load, strict_json
from layers import same_bits
from torch import nn

import nwave_param as nwp
from nwave_param.checkpoints.cli import main
from nwave_param.checkpoints.guards import Interrupted, Interruptions


def test_factory_prints_go_to_stderr_and_its_moves_are_undone(tmp_path, capfd, monkeypatch):
    (tmp_path / "chatty.py").write_text(
        "import os, sys\n"
        "from torch import nn\n"
        "print('import-time print')\n"
        "def build():\n"
        "    print('factory print')\n"
        "    os.system('echo from a child process')\n"
        "    os.chdir('/')\n"
        "    sys.path.append('/nowhere')\n"
        "    return nn.Sequential(nn.Linear(4, 6))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "chatty", raising=False)
    torch.save(nn.Sequential(nn.Linear(4, 6)).state_dict(), "model.pt")
    path = list(sys.path)
    code = main(["check", "model.pt", "--model", "chatty:build", "--json"])
    out, err = capfd.readouterr()
    assert code in (0, 1) and strict_json(out)["rows"][0]["name"] == "0.weight"
    assert "import-time print" in err and "factory print" in err and "from a child process" in err
    assert os.getcwd() == str(tmp_path) and sys.path == path


@pytest.mark.slow
@pytest.mark.parametrize("value, verdict", [(0.5, 0), (2.0, 1)], ids=["mappable", "not mappable"])
def test_a_closed_stdout_keeps_the_verdict(tmp_path, value, verdict):
    """``nwave-param check model.pt | head -n 1`` in a real shell: the report (1,500 weights, far
    more than a pipe holds) is cut by head, and the exit status is still the verdict, with nothing on stderr."""
    path = tmp_path / "many.pt"
    torch.save({f"fc{i}.weight": torch.full((5, 3), value) for i in range(1500)}, path)
    pipeline = f"'{sys.executable}' -m nwave_param check '{path}' --chip h1v1 | head -n 1; echo \"status ${{PIPESTATUS[0]}}\" >&2"
    result = subprocess.run(["bash", "-c", pipeline], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("limit 0.9, blocks of 5: ") and result.stdout.count("\n") == 1, result.stdout
    assert result.stderr == f"status {verdict}\n", result.stderr


@pytest.mark.slow
def test_project_into_a_closed_stdout_writes_its_output_and_exits_0(plain, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "nwave_param", "project", str(plain), "-o", str(tmp_path / "out.pt"), "--chip", "h1v1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    process.stdout.close()  # the reader is gone before anything is printed: `| head -n 0`
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0 and err == "", err
    written, expected = load(tmp_path / "out.pt"), nwp.project_state_dict(load(plain))[0]
    assert list(written) == list(expected) and all(same_bits(written[k], expected[k]) for k in expected)
    assert leftovers(tmp_path) == []


def _drop_with(callback):
    """Run ``callback`` as Python runs a weakref callback: where an exception cannot propagate."""
    thing = type("Thing", (), {})()
    reference = weakref.ref(thing, callback)  # noqa: F841 (alive until thing goes)
    del thing


def test_an_interrupt_python_cannot_raise_is_not_reported_and_still_stops_the_command(monkeypatch):
    """SIGINT inside a weakref callback (importlib's module locks) cannot propagate: Python hands it
    to ``sys.unraisablehook``, which would print "Exception ignored" and a traceback beside the
    command's one line.  Installed, the guard keeps it from the hook and ``check`` raises it; any
    other unraisable exception still reaches the hook that was in place, which is back after."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    interruptions = Interruptions()
    with interruptions.installed():
        _drop_with(lambda _: interruptions._handle(signal.SIGINT, None))
        _drop_with(lambda _: 1 / 0)
        with pytest.raises(Interrupted):
            interruptions.check()
    assert [type(report.exc_value) for report in reported] == [ZeroDivisionError]
    assert sys.unraisablehook == reported.append


def test_nested_guards_put_back_the_hook_and_the_handler_they_found(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    handler = signal.getsignal(signal.SIGINT)
    outer, inner = Interruptions(), Interruptions()
    with outer.installed():
        with inner.installed():
            pass
        with outer.installed():  # the same guard again, as the one INTERRUPTIONS would be
            pass
        _drop_with(lambda _: 1 / 0)  # the outer guard's hook passes it on
    assert sys.unraisablehook == reported.append and signal.getsignal(signal.SIGINT) == handler


    def interrupt(_):
        raise Interrupted("SIGINT")

    _drop_with(interrupt)  # no guard now: the hook that was there sees it
    assert [type(report.exc_value) for report in reported] == [ZeroDivisionError, Interrupted]


def test_a_signal_while_held_is_raised_on_leaving_and_a_completing_command_stops_for_it():
    """Held (torch's import), a signal is not raised where it lands but as the block ends; and
    ``complete_from_here`` raises a signal some library swallowed instead of letting the command
    write, and otherwise defers every later one."""
    interruptions = Interruptions()
    with interruptions.installed():
        with pytest.raises(Interrupted):
            with interruptions.held():
                signal.raise_signal(signal.SIGINT)  # delivered to the handler, which holds it
                landed = True
        assert landed and not interruptions.holding
        with pytest.raises(ZeroDivisionError):  # the block's own error goes first; the signal is still there
            with interruptions.held():
                1 / 0
        assert not interruptions.holding and interruptions.received == "SIGINT"
        with pytest.raises(Interrupted):
            interruptions.complete_from_here()
        assert not interruptions.deferred
    with interruptions.installed():
        interruptions.complete_from_here()
        interruptions._handle(signal.SIGINT, None)  # deferred: the command completes
        assert interruptions.deferred and interruptions.received is None
