"""Sweeps and comparisons: a run folder per point, a failed point kept apart, tables and pages from report.json, and
bad input refused before any work."""

import json
import shutil
from pathlib import Path

import pytest
from html_check import parse

from nexus_export.cli import main

DATA = Path(__file__).parents[1] / "data"
TASKS = str(DATA / "zero_shot")
FAST = ["--calib-samples", "4", "--eval-windows", "2", "--seq-len", "64", "--no-latency", "--no-decode-speed"]


@pytest.mark.slow
def test_a_failed_point_does_not_lose_the_others(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["-q", "sweep", "--model", "tiny-llama", "--method", "shortgpt", "--remove", "1,2", *FAST,
                 "--eval-tasks", "tiny_choice", "--eval-include", TASKS, "--eval-runtime", "both",
                 "--out", str(out)]) == 1  # removing both blocks of two is refused when the model is read
    stdout = capsys.readouterr().out
    assert "blocks removed 2 failed: UserError: cannot remove 2 of 2 blocks" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["plots", "remove-1", "sweep.html", "sweep.json", "sweep.md"]
    summary = json.loads((out / "sweep.json").read_text())
    ok, failed = summary["points"]
    assert ok["ok"] and not failed["ok"] and ok["value"] == 1 and failed["value"] == 2
    run = json.loads((out / "remove-1" / "report.json").read_text())
    assert ok["perplexity"] == run["perplexity"]["pruned"] and summary["runs"][0]["method"] == "shortgpt remove 1"
    assert (out / "remove-1" / "report.html").is_file() and (out / "plots" / "sweep.png").is_file()
    accuracy = run["zero_shot"]["tasks"]["tiny_choice"]  # lm-eval on the dense, pruned and ONNX models
    assert set(accuracy) == {"dense", "pruned", "onnx"} and accuracy["pruned"] == accuracy["onnx"]
    assert ok["accuracy"] == accuracy["pruned"]["acc"] and "| tiny_choice | acc |" in (out / "remove-1" /
                                                                                      "report.md").read_text()
    page = parse((out / "sweep.html").read_text())
    assert len(page.images) == 2 and "failed" in (out / "sweep.md").read_text()

    # compare reads a sweep folder as its finished points, beside a plain run folder
    assert main(["compare", str(out), str(out / "remove-1"), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"]
    assert [r["run"] for r in rows] == [f"{out}/remove-1", str(out / "remove-1")]


def test_a_sweep_under_torchrun_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "--model", "tiny-llama", "--method", "wanda", "--sparsities", "0.3", "--out",
                 str(tmp_path / "out")]) == 2
    assert "a sweep runs in one process" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--method", "wanda", "--sparsities", ""], "--sparsities is empty"),
    (["--method", "wanda", "--sparsities", "0.3,,0.5"], "has an empty entry; e.g. --sparsities 0.3,0.5,0.7"),
    (["--method", "wanda", "--sparsities", "0.3,half"], "'half' is not a number; e.g. --sparsities 0.3,0.5,0.7"),
    (["--method", "wanda", "--sparsities", "0.3,0.3"], "names a value twice"),
    (["--method", "wanda", "--sparsities", "0.3,1.5"], "--sparsities point 1.5: "),
    (["--method", "wanda"], "give exactly one of --sparsities"),
    (["--method", "wanda", "--sparsities", "0.3", "--slicings", "0.1"], "got --sparsities, --slicings"),
    (["--method", "shortgpt", "--remove", "1,x"], "'x' is not a whole number"),
    (["--method", "magnitude", "--pattern", "2:4", "--sparsities", "0.3,0.5"], "--sparsities point 0.3: "),
])
def test_bad_sweeps_stop_before_any_work(tmp_path, capsys, args, message):
    assert main(["sweep", "--model", "tiny-llama", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def run_folder(path: Path, pruned: float, method: str) -> Path:
    """A run folder holding a real run's report, with its perplexity and method changed."""
    path.mkdir(parents=True)
    report = json.loads((DATA / "report.json").read_text())
    report["perplexity"]["pruned"] = pruned
    report["passes"][0]["name"] = method
    (path / "report.json").write_text(json.dumps(report))
    return path


def test_compare_tables_runs_side_by_side(tmp_path, capsys):
    a, b = run_folder(tmp_path / "a", 300.0, "sparsegpt"), run_folder(tmp_path / "b", 280.5, "wanda")
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "method", "sparsity"]
    assert "sparsegpt 2:4" in table[1] and "300.000" in table[1] and "wanda 2:4" in table[2] and "280.500" in table[2]
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json", "compare.md", "plots"]
    rows = json.loads((out / "compare.json").read_text())["runs"]
    assert [r["pruned"] for r in rows] == [300.0, 280.5] and rows[0]["dense"] == rows[1]["dense"]
    page = parse((out / "compare.html").read_text())
    assert len(page.images) == 1 and (out / "plots" / "compare.png").is_file()
    assert "| " + str(a) + " | sparsegpt 2:4 |" in (out / "compare.md").read_text()
    # without --out: the same table on stdout, nothing written
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["compare", str(a), str(b)]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == table[:3] and sorted(p.name for p in tmp_path.iterdir()) == before


def test_every_subcommand_help_shows_an_example(capsys):
    from nexus_export.cli import _parser

    commands = [name for action in _parser()._subparsers._group_actions for name in action.choices]
    assert len(commands) == 10
    for command in commands:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert f"example: nexus-export {command}" in capsys.readouterr().out, command


def test_compare_refuses_what_is_not_a_run(tmp_path, capsys):
    good = run_folder(tmp_path / "good", 300.0, "wanda")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{not json")
    for bad, message in ((tmp_path / "empty", "is not a run folder (no report.json)"),
                         (tmp_path / "broken", "is not a nexus-export report"),
                         (tmp_path / "missing", "is not a folder")):
        assert main(["compare", str(good), str(bad), "--out", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "cmp").exists()
    shutil.rmtree(good)
