"""The files a command writes (nwave_param.checkpoints.outputs): all or none, never over its input,
nothing left behind on a full disk or a Ctrl-C, with the mode a normal write gives."""

import errno
import io
import json
import os
import signal
import stat

import torch
from commandline import error, leftovers, load, run


def test_project_never_overwrites_its_input(plain, tmp_path, capsys):
    before = plain.read_bytes()
    assert "overwrite the input" in error(capsys, "project", plain, "-o", plain)
    (tmp_path / "link.pt").symlink_to(plain)
    assert "overwrite the input" in error(capsys, "project", plain, "-o", tmp_path / "link.pt")
    assert "overwrite the input" in error(capsys, "check", plain, f"--json={plain}")
    assert "name the same file" in error(capsys, "project", plain, "-o", tmp_path / "x", f"--json={tmp_path / 'x'}")
    assert plain.read_bytes() == before


def test_bad_destinations(plain, tmp_path, capsys):
    assert "is a directory" in error(capsys, "project", plain, "-o", tmp_path)
    assert "no directory" in error(capsys, "project", plain, "-o", tmp_path / "missing" / "out.pt")
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")
    assert "no such file" in error(capsys, "project", tmp_path / "missing.pt", "-o", existing)
    assert existing.read_bytes() == b"keep me"


def test_outputs_are_written_all_or_none(plain, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")
    unwritable = "/proc/report.json"  # no file can be made there, even by root
    line = error(capsys, "project", plain, "-o", existing, f"--json={unwritable}")
    assert f"cannot write {unwritable}" in line and "nothing was written" in line
    assert existing.read_bytes() == b"keep me" and leftovers(tmp_path) == []
    # the renames: if the second fails, the message says what was written and what was not
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    line = error(capsys, "project", plain, "-o", existing, f"--json={tmp_path / 'changes.json'}")
    assert f"wrote {existing}, but cannot write {tmp_path / 'changes.json'}" in line
    assert load(existing) and not (tmp_path / "changes.json").exists() and leftovers(tmp_path) == []


def test_unwritable_directory_fails_cleanly(plain, tmp_path, capsys):
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    if os.geteuid() == 0:  # root ignores mode bits; no one creates files in /proc
        directory = "/proc"
    assert "cannot write" in error(capsys, "project", plain, "-o", os.path.join(directory, "out.pt"))
    assert not os.path.exists(os.path.join(directory, "out.pt"))


class _FullDisk(io.BytesIO):
    """A file on a disk that fills up after 1000 bytes."""

    def write(self, data):
        if self.tell() + len(data) > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def test_full_disk_leaves_no_file_behind(plain, tmp_path, capsys, monkeypatch):
    real_fdopen = os.fdopen

    def fdopen(handle, *args, **kwargs):
        os.close(handle)
        return _FullDisk()

    monkeypatch.setattr(os, "fdopen", fdopen)
    line = error(capsys, "project", plain, "-o", tmp_path / "out.pt")
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert "cannot write" in line and "No space left on device" in line and "nothing was written" in line
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.pt").exists()


def test_a_signal_once_the_outputs_are_being_renamed_lets_the_command_complete(plain, tmp_path, capsys, monkeypatch):
    """Renaming has begun: stopping now would leave some outputs new and say nothing was written."""
    real_replace, before = os.replace, signal.getsignal(signal.SIGTERM)

    def replace(source, target):
        os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next line
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    code, out, err = run(capsys, "project", plain, "-o", tmp_path / "out.pt", f"--json={tmp_path / 'changes.json'}", "--chip", "h1v1")
    assert code == 0 and err == "" and "wrote" in out
    assert load(tmp_path / "out.pt") and json.loads((tmp_path / "changes.json").read_text())["weights"]
    assert signal.getsignal(signal.SIGTERM) is before  # and the handler is the caller's again


def test_ctrl_c_while_saving_leaves_the_old_output_and_no_file_behind(plain, tmp_path, capsys, monkeypatch):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep me")

    def interrupted_save(obj, stream):
        stream.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted_save)
    line = error(capsys, "project", plain, "-o", existing)
    assert "interrupted while writing" in line and existing.read_bytes() == b"keep me" and leftovers(tmp_path) == []


def test_output_mode_is_what_a_normal_write_gives(plain, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        assert run(capsys, "project", plain, "-o", tmp_path / "new.pt")[0] == 0
        replaced = tmp_path / "replaced.pt"
        replaced.write_bytes(b"old")
        replaced.chmod(0o604)
        assert run(capsys, "project", plain, "-o", replaced)[0] == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "new.pt").stat().st_mode) == 0o640
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o604 and load(replaced)
