"""report.html and the plots: a valid, self-contained page whose every image exists, from a real run and from the
report data of structural passes."""

import base64
import json
from pathlib import Path

import pytest
from html_check import PNG, StrictPage, parse

from nexus_export.cli import main
from nexus_export.reporting import plots
from nexus_export.reporting.report import write_reports


def check_page(folder: Path) -> StrictPage:
    """report.html parses strictly, embeds every plot as a PNG, fetches nothing; report.md's links exist."""
    text = (folder / "report.html").read_text()
    page = parse(text)
    assert page.links == [] and "http" not in "".join(page.images)
    pngs = sorted(p.name for p in (folder / "plots").iterdir())
    assert len(page.images) == len(pngs) > 0
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG)
    md = (folder / "report.md").read_text()
    linked = [line.split("](", 1)[1].rstrip(")") for line in md.splitlines() if line.startswith("![")]
    assert sorted(Path(p).name for p in linked) == pngs and all((folder / p).is_file() for p in linked)
    assert (folder / "report.html").stat().st_size < 3 * 2**20
    return page


@pytest.mark.slow
def test_a_run_writes_a_valid_self_contained_page(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", "--pattern", "2:4",
                 "--eval-windows", "2", "--seq-len", "64", "--fp16", "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    check_page(out)
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["decode_speed.png", "latency.png", "perplexity.png",
                                                                 "sizes.png", "sparsity.png"]
    text = (out / "report.html").read_text()
    report = json.loads((out / "report.json").read_text())
    assert "tiny-llama | magnitude | sparsity 50.0% (2:4)" in text and "magnitude:" in text  # headline and recipe
    assert f"{report['perplexity']['dense']:.3f}" in text and "model.fp16.onnx" in text
    roles = report["sparsity"]["roles"]
    assert roles["model.layers.1.mlp.down_proj"] == {"block": 1, "role": "mlp_out", "params": 128 * 64}


def structural_report(tmp_path: Path) -> dict:
    """The report of a real run, with ShortGPT's scores and SliceGPT's widths in its passes."""
    report = json.loads((Path(__file__).parents[1] / "data" / "report.json").read_text())
    report["passes"] = [
        {"name": "slicegpt", "wall_s": 1.0, "params_before": 10, "params_after": 8, "peak_rss_mb": 100.0,
         "changes": {"hidden_before": 64, "widths": {"0": 48, "1": 40}}},
        {"name": "shortgpt", "wall_s": 1.0, "params_before": 8, "params_after": 4, "peak_rss_mb": 100.0,
         "changes": {"strategy": "similarity", "scores": {"0": 0.2, "1": 0.05}, "removed": [1]}},
    ]
    return report


def test_structural_passes_get_their_plots(tmp_path):
    write_reports(structural_report(tmp_path), tmp_path)
    page = check_page(tmp_path)
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert "widths.png" in names and "block_scores.png" in names and len(page.images) == len(names)
    text = (tmp_path / "report.html").read_text()
    assert "Stream width per block" in text and "Block scores and the removed blocks" in text


def test_without_matplotlib_the_page_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: (False, "matplotlib is not installed"))
    write_reports(structural_report(tmp_path), tmp_path)
    text = (tmp_path / "report.html").read_text()
    page = parse(text)
    assert page.images == [] and "pip install &#x27;nexus-export[report]&#x27;" in text
    assert not (tmp_path / "plots").exists() and "![" not in (tmp_path / "report.md").read_text()
