"""Crash-safe output folders: staging folders of dead runs are removed (never a live run's), SIGTERM unwinds like
Ctrl-C, and a run killed with SIGKILL resumes to the bytes of an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_tiny
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


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    """A 4-block tiny LLaMA saved as a Hugging Face folder, so passes checkpoint several blocks."""
    from nexus_export.zoo import byte_level_tokenizer

    folder = tmp_path_factory.mktemp("deep")
    make_tiny("llama", layers=4).save_pretrained(folder, safe_serialization=True)
    byte_level_tokenizer(512).save_pretrained(folder)
    return folder


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "nexus_export", "-q", *args]


@pytest.mark.slow
@pytest.mark.parametrize("method, args", [("sparsegpt", ["--pattern", "2:4"])])
def test_sigkill_then_resume_gives_the_same_bytes(tmp_path, deep_folder, method, args):
    """A real SIGKILL, for one pass (each CLI run is a process start and a capture, 20 s here: the resume of every
    pass, structural ones included, is checked in process by
    test_calibration.test_every_long_pass_resumes_to_the_same_result; the checkpoint and partial-output code a kill
    tests is the same for every pass)."""
    common = ["prune", "--model", str(deep_folder), "--method", method, *args, "--calib-samples", "8",
              "--seq-len", "64", "--eval-windows", "2", "--no-latency", "--onnx-eval", "off"]
    subprocess.run(cli(*common, "--out", str(tmp_path / "a")), check=True, capture_output=True)
    proc = subprocess.Popen(cli(*common, "--out", str(tmp_path / "b")), stderr=subprocess.DEVNULL)
    state = tmp_path / ".b.checkpoint" / f"0-{method}" / "state.json"
    deadline = time.monotonic() + 120
    while not state.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "b").exists() and list(tmp_path.glob(".b.partial-*"))
    done = subprocess.run(cli(*common, "--out", str(tmp_path / "b"), "--resume"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # partial and checkpoint folders are gone
    assert (tmp_path / "a" / "model.onnx.data").read_bytes() == (tmp_path / "b" / "model.onnx.data").read_bytes()


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
