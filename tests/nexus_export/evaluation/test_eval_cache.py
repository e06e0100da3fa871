"""Evaluation-cache entries prove themselves: an edited number, a copied file or garbage is ignored with a reason,
measured again, and the report says so."""

from __future__ import annotations

import json

import pytest

from nexus_export.cli import main
from nexus_export.evaluation import eval_cache

FAST = ["--eval-windows", "2", "--seq-len", "32", "--no-latency", "--no-decode-speed"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_EXPORT_EVAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_entry_reads_back_only_under_its_own_key_and_content(cache):
    eval_cache.save("a" * 40, {"perplexity": 259.47, "tokens": 126})
    assert eval_cache.load("a" * 40) == eval_cache.Lookup({"perplexity": 259.47, "tokens": 126})
    assert eval_cache.load("b" * 40) == eval_cache.Lookup(None)  # nothing there: nothing rejected
    (cache / ("b" * 40 + ".json")).write_text((cache / ("a" * 40 + ".json")).read_text())  # copied under another key
    assert "another key" in eval_cache.load("b" * 40).rejected
    path = cache / ("a" * 40 + ".json")
    data = json.loads(path.read_text())
    data["result"]["perplexity"] *= 1.5
    path.write_text(json.dumps(data))
    lookup = eval_cache.load("a" * 40)
    assert lookup.result is None and "checksum" in lookup.rejected
    path.write_text("{not json")
    assert "not valid JSON" in eval_cache.load("a" * 40).rejected
    path.write_text(json.dumps({"perplexity": 1.0}))  # an entry of an older version
    assert "not an entry of this version" in eval_cache.load("a" * 40).rejected


@pytest.mark.slow
def test_a_changed_entry_is_measured_again_and_the_report_says_so(cache, tmp_path, caplog):
    first = tmp_path / "first"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", *FAST, "--out", str(first)]) == 0
    dense = json.loads((first / "report.json").read_text())["perplexity"]["dense"]
    (entry,) = cache.glob("*.json")
    data = json.loads(entry.read_text())
    data["result"]["perplexity"] *= 1.5
    entry.write_text(json.dumps(data))
    second = tmp_path / "second"
    with caplog.at_level("WARNING"):
        assert main(["-q", "prune", "--model", "tiny-llama", "--method", "magnitude", *FAST, "--out",
                     str(second)]) == 0
    ppl = json.loads((second / "report.json").read_text())["perplexity"]
    assert ppl["dense"] == dense and not ppl["dense_from_cache"] and "checksum" in ppl["dense_remeasured"]
    assert "measured again: the cached entry was ignored" in (second / "report.md").read_text()
    assert sum("is ignored" in r.message for r in caplog.records) == 1
