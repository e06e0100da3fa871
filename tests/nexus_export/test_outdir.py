"""Crash-safe output folders: staging folders of dead runs are removed (never a live run's) and SIGTERM unwinds like
Ctrl-C. A run killed with SIGKILL and resumed is test_distributed's killed writer (a 2-process run resumed by one
process, to the uninterrupted result)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from nexus_export.errors import UserError
from nexus_export.outdir import check_output_dir, remove_stale, staged_output


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_folders_of_dead_runs_go_and_live_ones_stay(tmp_path):
    out = tmp_path / "run"
    dead, alive = dead_pid(), os.getppid()
    for kind in ("partial", "scratch", "old"):
        (tmp_path / f".run.{kind}-{dead}").mkdir()
        (tmp_path / f".run.{kind}-{alive}").mkdir()
    (tmp_path / ".run.checkpoint").mkdir()  # a checkpoint is kept for --resume
    (tmp_path / ".other.partial-1").mkdir()  # another output's folder is not ours to judge
    with staged_output(out) as tmp:
        (tmp / "x").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".other.partial-1", ".run.checkpoint", "run"] + [f".run.{k}-{alive}" for k in ("partial", "scratch", "old")])
    assert remove_stale(out) == []


def test_an_output_moved_aside_by_a_killed_run_is_put_back(tmp_path):
    moved = tmp_path / f".run.old-{dead_pid()}"  # killed between moving the old output aside and renaming the new
    moved.mkdir()
    (moved / "report.json").write_text("{}")
    with pytest.raises(UserError, match="not empty"):
        with staged_output(tmp_path / "run"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (tmp_path / "run" / "report.json").is_file()


@pytest.mark.parametrize("out, message", [("", "--out is empty"), ("file/sub", "which is a file, not a folder")])
def test_outputs_that_cannot_be_written(tmp_path, out, message):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=message):
        check_output_dir(str(tmp_path / out) if out else out, False)


def test_a_read_only_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(UserError, match="permission denied"):
            check_output_dir(locked / "out", False)
    finally:
        locked.chmod(0o700)


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "nexus_export", "-q", *args]


@pytest.mark.slow
def test_sigterm_removes_the_partial_output(tmp_path):
    proc = subprocess.Popen(cli("prune", "--model", "tiny-llama", "--method", "sparsegpt", "--pattern", "2:4",
                                "--seq-len", "64", "--eval-windows", "2", "--out", str(tmp_path / "o")),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".o.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated; no output written" in err
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".o.checkpoint")] == []


HOLD = """
import sys
from pathlib import Path
from nexus_export.outdir import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_second_run_on_the_same_output_is_refused_until_the_first_ends(tmp_path, capsys):
    """Another process holds the output: the CLI refuses with exit 2 naming its pid and writes nothing; once that
    process is killed (SIGKILL: no cleanup of its own) the lock is free and the lock file goes with the next run."""
    from nexus_export.cli import main

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", "--calib-samples", "2",
                "--seq-len", "16", "--eval-windows", "1", "--no-latency", "--onnx-eval", "off", "--out", str(out)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"another nexus-export run (pid {holder.pid}) is writing {out}" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock"]
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            with staged_output(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    with staged_output(out) as tmp:
        (tmp / "x").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
