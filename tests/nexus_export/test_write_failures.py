"""Writes that fail midway (a file-size limit standing in for a full disk): one clear line, and no partial output
folder, staging folder or scratch file left behind."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

FAST = ["--eval-windows", "2", "--seq-len", "32", "--no-latency", "--no-decode-speed"]


def limited(limit: int, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """``nexus-export ARGS`` in a child process whose files may not grow past ``limit`` bytes."""
    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "nexus_export", "-q", *args], capture_output=True, text=True,
                          preexec_fn=cap, timeout=600, cwd=cwd)


@pytest.mark.parametrize("exc", [
    OSError(28, "No space left on device", "/out/model.onnx.data"),
    OSError("Not enough free space to write 1050673152 bytes after offset 15009849344"),  # numpy's tofile: no errno
    RuntimeError("wrapped"),
])
def test_a_full_disk_is_said_in_one_line_however_it_is_raised(exc):
    from nexus_export.cli import _disk_full

    said = _disk_full(exc)
    if isinstance(exc, RuntimeError):
        assert said is None  # any other failure stays an internal error
    else:
        assert said.startswith("could not write") and "free disk space" in said


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_a_model_file_that_cannot_be_written_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    result = limited(200_000, "prune", "--model", "tiny-llama", "--method", "magnitude", *FAST, "--out", str(out))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("nexus-export: error: could not write") and "File too large" in lines[-1]
    assert "nothing was written" in lines[-1] and "Traceback" not in result.stderr
    assert leftovers(tmp_path) == []  # no run folder, no .run.partial-*, no scratch, no lock


@pytest.mark.slow
def test_a_spill_that_cannot_be_written_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    result = limited(60_000, "prune", "--model", "tiny-llama", "--method", "wanda", "--calib-samples", "2", *FAST,
                     "--memory-budget", "300KiB", "--out", str(out))
    assert result.returncode != 0 and "File too large" in result.stderr.strip().splitlines()[-1], result.stderr
    # the calibrated blocks' checkpoint stays for --resume (as after Ctrl-C), and holds no half-written file
    assert "Traceback" not in result.stderr and leftovers(tmp_path) == [".run.checkpoint"]
    assert not [p for p in (tmp_path / ".run.checkpoint").rglob("*") if p.name.startswith(".") or "tmp" in p.name]


@pytest.mark.slow
def test_a_bundle_that_cannot_be_written_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    assert limited(2**30, "prune", "--model", "tiny-llama", "--method", "magnitude", *FAST,
                   "--out", str(run)).returncode == 0
    before = leftovers(tmp_path)
    result = limited(200_000, "package", str(run), "--out", str(tmp_path / "bundle"))
    assert result.returncode == 1 and "File too large" in result.stderr, result.stderr
    assert leftovers(tmp_path) == before
