"""Model cards: Hugging Face layout (YAML metadata first), the report's numbers, how to load or run the files."""

import json
from pathlib import Path

import yaml

from nexus_export.reporting.model_card import base_model, bundle_card, hf_card

REPORT = json.loads((Path(__file__).parents[1] / "data" / "report.json").read_text())


def metadata(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_cards_carry_the_reports_numbers_and_metadata():
    card = hf_card(REPORT)
    meta = metadata(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "sparsegpt" in meta["tags"] and "base_model" not in meta  # a random zoo model has no Hub id
    ppl = REPORT["perplexity"]
    assert f"| dense perplexity (PyTorch) | {ppl['dense']:.3f} |" in card
    assert f"| pruned perplexity (pytorch) | {ppl['pruned']:.3f} |" in card
    assert "| weight sparsity of the pruned layers | 50.0% (2:4) |" in card
    recipe = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert recipe == REPORT["recipe"]

    onnx = bundle_card(REPORT, "model.onnx")
    assert metadata(onnx)["library_name"] == "onnx"
    assert "nexus-export build-engine model.onnx" in onnx and "fp16 file perplexity (onnxruntime)" in onnx


def test_a_zoo_model_names_its_hub_base_model():
    report = {**REPORT, "model": {**REPORT["model"], "origin": {"zoo": "smollm2-135m"}}}
    assert base_model(report) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert metadata(hf_card(report))["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
