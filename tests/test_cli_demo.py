"""``nwave-param demo``'s options, paths and outputs, with the training stubbed out (test_demo.py
runs the demo itself)."""

import errno
import functools
import json
import os
import sys

from commandline import error, run


def test_demo_json_means_the_same(capsys, monkeypatch, tmp_path):
    from nwave_param import demo

    def fake_main(epochs, json_path, plot_path, chip, bits, mismatch, task, seed):  # demo.main's contract
        data = {"epochs": epochs, "plot": plot_path, "chip": chip, "bits": bits, "mismatch": mismatch, "task": task, "seed": seed}
        print("the demo's table", file=sys.stderr if json_path == "-" else sys.stdout)
        if json_path == "-":
            print(json.dumps(data))
        else:
            with open(json_path, "w") as stream:
                json.dump(data, stream)
        return 0

    monkeypatch.setattr(demo, "main", fake_main)
    code, out, err = run(capsys, "demo", "--quick", "--json")
    # the kit's H1v2, digits
    expected = {"epochs": 3, "plot": None, "chip": "h1v2", "bits": None, "mismatch": 0.0, "task": "digits", "seed": 0}
    assert code == 0 and json.loads(out) == expected and "the demo's table" in err
    for form in (["--json", tmp_path / "a.json"], [f"--json={tmp_path / 'b.json'}"]):
        code, out, _ = run(
            capsys, "demo", "--epochs", "2", "--chip", "H1V1", "--bits", "5", "--mismatch", "0.02", "--task", "digits", "--seed", "3", *form
        )
        assert code == 0 and "the demo's table" in out
    for name in ("a.json", "b.json"):
        assert json.loads((tmp_path / name).read_text()) == {
            "epochs": 2, "plot": None, "chip": "h1v1", "bits": 5, "mismatch": 0.02, "task": "digits", "seed": 3
        }
    code, out, _ = run(capsys, "demo", "--json")
    assert code == 0 and json.loads(out)["epochs"] is None  # the task's own number of epochs
    assert "--epochs" in error(capsys, "demo", "--epochs", "0")
    assert "--seed" in error(capsys, "demo", "--seed", "-1")
    assert "--seed must be in [0, 2**64)" in error(capsys, "demo", "--seed", str(2**64))
    assert "bits" in error(capsys, "demo", "--bits", "1")
    assert "mismatch" in error(capsys, "demo", "--mismatch", "-0.1")


def test_demo_paths_are_checked_before_training(capsys, monkeypatch, tmp_path):
    from nwave_param import demo

    def trains(*_):
        raise AssertionError("trained")

    monkeypatch.setattr(demo, "main", trains)
    for option in (f"--json={tmp_path / 'missing' / 'x.json'}", "--plot"):
        argv = ["demo", "--quick", option] + ([str(tmp_path / "missing" / "x.png")] if option == "--plot" else [])
        assert "no directory" in error(capsys, *argv)
    assert "is a directory" in error(capsys, "demo", "--quick", "--plot", tmp_path)


def test_the_demo_writes_its_json_and_picture_all_or_none(capsys, monkeypatch, tmp_path):
    """The picture fails half-way (a full disk, Ctrl-C): the JSON, complete by then, is not left
    behind either, nor any temporary file, and nothing was printed."""
    from nwave_param import demo

    class Trained:
        def to_dict(self):
            return {}

    def half_a_picture(outcomes, placement, stream, limit, failure):
        stream.write(b"\x89PNG half")
        raise failure

    monkeypatch.setattr(demo, "run", lambda epochs, spec, task, seed: ({"hardened": Trained()}, Trained()))
    failures = (
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        (KeyboardInterrupt(), "interrupted while writing"),
    )
    for failure, said in failures:
        monkeypatch.setattr(demo, "plot", functools.partial(half_a_picture, failure=failure))
        line = error(capsys, "demo", "--quick", f"--json={tmp_path / 'demo.json'}", "--plot", tmp_path / "demo.png")
        assert said in line and "nothing was written" in line, line
        assert sorted(os.listdir(tmp_path)) == [], os.listdir(tmp_path)


def test_a_signal_while_the_demo_imports_its_libraries_stops_it_right_after_them(capsys, monkeypatch):
    """The demo's libraries (snnTorch, scikit-learn, matplotlib) import with the signal held, as
    torch does: it lands after they have imported, and the command ends with its one line."""
    import signal

    from nwave_param import demo

    imported = []

    def import_libraries(task, plot):
        signal.raise_signal(signal.SIGINT)  # mid-import
        imported.append((task, plot))

    monkeypatch.setattr(demo, "import_libraries", import_libraries)
    monkeypatch.setattr(demo, "main", lambda *args, **kwargs: imported.append("trained"))
    code, out, err = run(capsys, "demo", "--task", "vowels", "--plot", "demo.png")
    assert code == 2 and imported == [("vowels", True)] and out == ""
    assert err == "nwave-param: error: interrupted by SIGINT: nothing was written\n"
