"""Installed as a package (`pip install .`, not editable), nexus-export works away from the repository: the
command line runs and the zoo names resolve from package data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_non_editable_install_runs_the_zoo_model(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "out", "build", "*.egg-info",
                                                                "__pycache__", ".hypothesis", "docs", "bench"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(source)], check=True,
                   capture_output=True)
    assert not (target / "nexus_export" / "__init__.py").is_symlink()
    models = sorted(p.name for p in (target / "nexus_export" / "models").iterdir() if p.name != "__pycache__")
    assert models == ["__init__.py", "smollm2-135m.yaml", "tiny-llama.yaml", "zoo.py"]
    packages = [p.parent.relative_to(source) for p in source.rglob("__init__.py")
                if p.parts[len(source.parts)] in ("nexus_export", "passes", "runtimes")]
    assert [p for p in packages if not (target / p / "__init__.py").is_file()] == []  # every subpackage installed
    env = {**os.environ, "PYTHONPATH": str(target)}  # ahead of the editable install of the test environment
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([sys.executable, "-c", "import nexus_export; print(nexus_export.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)
    run = subprocess.run([str(target / "bin" / "nexus-export"), "-q", "prune", "--model", "tiny-llama", "--method",
                          "magnitude", "--pattern", "2:4", "--eval-windows", "2", "--seq-len", "64", "--no-latency",
                          "--out", "out"], cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads((work / "out" / "report.json").read_text())
    assert report["model"]["name"] == "tiny-llama" and (work / "out" / "model.onnx").is_file()
