"""README.md model cards, in the Hugging Face layout (YAML metadata, then sections), generated from a run's report.

One for the ``--save-hf`` folder (loaded with transformers) and one for every deployment bundle (run with
onnxruntime, or built into a TensorRT engine). Every number in a card is the report's.
"""

from __future__ import annotations

import yaml

from nexus_export.models.zoo import zoo_entries
from nexus_export.reporting.compare import method_label


def base_model(report: dict) -> str | None:
    """The Hugging Face Hub id of the model the run started from, when known (zoo entries name theirs)."""
    zoo = report["model"].get("origin", {}).get("zoo")
    return zoo_entries().get(zoo, {}).get("hub_id") if zoo else None


def _metadata(report: dict, library: str, tags: list[str]) -> str:
    meta = {"library_name": library, "pipeline_tag": "text-generation",
            "tags": ["nexus-export", "pruned", *(p["name"] for p in report["passes"]), *tags]}
    base = base_model(report)
    if base:
        meta["base_model"] = base
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _results(report: dict) -> list[str]:
    ppl, sparsity = report["perplexity"], report["sparsity"]
    rows = [("dense perplexity (PyTorch)", f"{ppl['dense']:.3f}"),
            (f"pruned perplexity ({ppl.get('pruned_runtime', 'pytorch')})", f"{ppl['pruned']:.3f}")]
    if ppl.get("onnx") is not None and ppl.get("pruned_runtime", "pytorch") == "pytorch":  # else the row above
        rows.append(("pruned perplexity (onnxruntime)", f"{ppl['onnx']:.3f}"))
    for a in report.get("artifacts", [])[1:]:
        if a.get("perplexity") is not None:
            rows.append((f"{a['name']} file perplexity (onnxruntime)", f"{a['perplexity']:.3f}"))
    rows += [("weight sparsity of the pruned layers", f"{sparsity['overall']:.1%} ({sparsity['pattern']})"),
             ("parameters", f"{report['model']['params_dense']:,} -> {report['model']['params_pruned']:,}")]
    if report["parity"].get("max_abs_diff") is not None:
        rows.append(("max logits difference, PyTorch vs onnxruntime", f"{report['parity']['max_abs_diff']:.2e}"))
    for task, result in ((report.get("zero_shot") or {}).get("tasks") or {}).items():
        rows.append((f"{task} accuracy (dense -> pruned)",
                     f"{result['dense']['acc']:.1%} -> {result['pruned']['acc']:.1%}"))
    return ["| metric | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
            f"Perplexity on {ppl['dataset']} ({ppl['tokens']:,} predicted tokens)."]


def _common(report: dict, title: str, library: str, tags: list[str]) -> list[str]:
    base = base_model(report)
    name = report["model"]["name"]
    return [_metadata(report, library, tags), f"# {title}", "",
            f"{name}{f' ({base})' if base else ''} pruned with nexus-export {report['tool']['version']}: "
            f"{method_label(report)}.", "", "## Method", "",
            *(f"- **{p['name']}**: " + ", ".join(f"{k} {v}" for k, v in p.get("options", {}).items()) for p in
              report["passes"]),
            "", "## Results", "", *_results(report), "", "## Recipe", "",
            "Rerun with `nexus-export run recipe.yaml --out DIR`:", "", "```yaml",
            yaml.safe_dump(report["recipe"], sort_keys=False).rstrip(), "```", ""]


def hf_card(report: dict) -> str:
    """The card of a ``--save-hf`` folder."""
    lines = _common(report, f"{report['model']['name']}, pruned ({method_label(report)})", "transformers", [])
    lines += ["## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", "",
              "Pruned weights are stored as zeros in dense tensors: the file is as large as the dense model's, and "
              "the speed-up needs sparse kernels (e.g. the ONNX model of the same run in TensorRT with 2:4 sparse "
              "tactics).", ""]
    return "\n".join(lines)


def bundle_card(report: dict, model_file: str, cache_model: str | None = None) -> str:
    """The card of a deployment bundle holding ``model_file`` (an ONNX model) and its key/value-cache twin
    ``cache_model`` (None: the bundle has none)."""
    lines = _common(report, f"{report['model']['name']}, pruned ({method_label(report)}), ONNX", "onnx",
                    ["onnx", "onnxruntime"])
    lines += ["## How to use", "", f"`{model_file}` takes `input_ids` and `attention_mask` ([batch, sequence], int64) "
              "and returns `logits`. " + (
                  f"`{cache_model}` is the same model with a key/value cache (`position_ids`, "
                  "`past_key_values.{i}.key`/`.value` in, `present.{i}.key`/`.value` out), which generates. "
                  if cache_model else "") +
              "The tokenizer files are beside them. Check the bundle first: `nexus-export verify .` (hashes, one "
              "forward pass" + (", and a short greedy generation against the tokens recorded here)." if cache_model
                               else ")."), ""]
    if cache_model:
        lines += ["Generate text: `nexus-export generate . --prompt \"The capital of France is\"`, or with "
                  "onnxruntime-genai, which loads this folder as it is (`genai_config.json`):", "",
                  "```python", "import onnxruntime_genai as og", "", 'model = og.Model(".")',
                  "tokenizer = og.Tokenizer(model)", "params = og.GeneratorParams(model)",
                  "params.set_search_options(max_length=64)", "generator = og.Generator(model, params)",
                  'generator.append_tokens(tokenizer.encode("The capital of France is"))',
                  "while not generator.is_done():", "    generator.generate_next_token()",
                  "print(tokenizer.decode(generator.get_sequence(0)))", "```", ""]
    lines += ["Score text with the full-sequence model:", "",
              "```python", "import numpy as np", "import onnxruntime as ort",
              "from transformers import AutoTokenizer", "", 'tokenizer = AutoTokenizer.from_pretrained(".")',
              f'session = ort.InferenceSession("{model_file}")',
              'ids = tokenizer("The capital of France is", return_tensors="np")["input_ids"].astype(np.int64)',
              'logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]', "```",
              ""]
    if report.get("deploy", {}).get("variant") in ("int4", "int8"):
        lines += [f"`{model_file}` holds MatMulNBits weights for onnxruntime; TensorRT builds from the float model of "
                  "the same run.", ""]
    else:
        lines += [f"TensorRT: `nexus-export build-engine {model_file} --out engine/` (2:4 sparse tactics where the "
                  "weights allow).", ""]
    return "\n".join(lines)
