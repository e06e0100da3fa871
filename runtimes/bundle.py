"""Deployment bundles: a self-contained folder (optionally a .tar.gz) a deployment can ship, and its verification.

A bundle holds the deployable ONNX model and its external data, its key/value-cache twin with ``genai_config.json``
(so onnxruntime-genai loads the bundle as it is), the tokenizer files, the generation config, and ``manifest.json``:
input/output signature (names, dtypes, symbolic dims), opset, recipe, sparsity summary, perplexity before/after,
sizes, the sha256 of every file, the nexus-export, torch and onnx versions, and the tokens a short greedy generation
gave when the bundle was made. ``verify_bundle`` re-checks every hash, runs one forward pass in onnxruntime, and
generates those tokens again; a changed, truncated or missing file is named, and so is the first token that differs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx

from nexus_export.errors import UserError, VerificationFailed
from nexus_export.generate.loop import generate
from nexus_export.outdir import sha256_file, staged_output
from nexus_export.reporting.model_card import bundle_card

from .onnx_check import open_onnx
from .onnx_export import cache_path

log = logging.getLogger(__name__)

FORMAT = "nexus-export-bundle/1"
MANIFEST = "manifest.json"
# what the tokenizer and generation config save beside the model (any of them; older runs kept them in tokenizer/)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")
GENAI_CONFIG = "genai_config.json"
CHECK_TOKENS = 16  # the greedy tokens a bundle records and verify generates again




def signature(model_path: Path) -> dict:
    """Inputs and outputs of an ONNX model: name, element type and dims (symbolic dims by name)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph

    def describe(value) -> dict:
        tensor = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "dims": dims}

    inits = {i.name for i in graph.initializer}
    return {"inputs": [describe(v) for v in graph.input if v.name not in inits],
            "outputs": [describe(v) for v in graph.output]}


def make_bundle(run_dir: str | Path, bundle_dir: str | Path, archive: bool = False, force: bool = False) -> Path:
    """Package a finished run folder (report.json + ONNX) into ``bundle_dir``; with ``archive`` also a .tar.gz."""
    run_dir, bundle_dir = Path(run_dir), Path(bundle_dir)
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise UserError(f"{run_dir} holds no report.json: pass the output folder of `nexus-export prune` or `run`")
    try:
        report = json.loads(report_path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{report_path} is not valid JSON: the run folder is damaged; run the pruning again") from None
    model_name = report.get("deploy", {}).get("model", "model.onnx")
    model_path = run_dir / model_name
    if not model_path.is_file():
        raise UserError(f"{run_dir} holds no {model_name}: the run did not finish, or files were moved")
    open_onnx(model_path)  # its external data there and whole, before anything is copied
    twin = cache_path(model_path)
    try:
        card = bundle_card(report, model_name, twin.name if twin.is_file() else None)
    except (KeyError, TypeError) as exc:
        raise UserError(f"{report_path} lacks {exc} (written by another version, or damaged); run the pruning "
                        "again") from None
    with staged_output(bundle_dir, force) as tmp:
        for path in sorted(run_dir.glob(model_name + "*")):
            shutil.copy2(path, tmp / path.name)
        if twin.is_file():
            shutil.copy2(twin, tmp / twin.name)
            if (run_dir / GENAI_CONFIG).is_file():
                shutil.copy2(run_dir / GENAI_CONFIG, tmp / GENAI_CONFIG)
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, tmp / name)
        if (run_dir / "tokenizer").is_dir():
            shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
        if (run_dir / "recipe.yaml").is_file():
            shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")
        (tmp / "README.md").write_text(card)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        check = _record_generation(tmp / twin.name, report) if twin.is_file() else None
        manifest = {
            "format": FORMAT,
            "model": model_name,
            **({"cache_model": twin.name, "cache_signature": signature(tmp / twin.name)} if twin.is_file() else {}),
            **({"generation_check": check} if check else {}),
            **signature(tmp / model_name),
            "opset": report.get("onnx", {}).get("opset"),
            "recipe": report.get("recipe"),
            "sparsity": {k: v for k, v in report.get("sparsity", {}).items() if k != "per_layer"},
            "perplexity": report.get("perplexity"),
            "deploy": report.get("deploy"),
            "sizes": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files},
            "sha256": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files},
            "versions": _versions(report),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if archive:
        with tarfile.open(bundle_dir.with_suffix(".tar.gz"), "w:gz") as tar:
            tar.add(bundle_dir, arcname=bundle_dir.name)
    log.info("bundle %s: %d files, %.1f MiB", bundle_dir, len(manifest["sha256"]),
             sum(manifest["sizes"].values()) / 2**20)
    return bundle_dir


def _record_generation(cache_model: Path, report: dict) -> dict:
    """The greedy tokens the bundle's cache model gives for the run's sample prompt (or a fixed token prompt)."""
    from . import decode, ort

    prompt = (report.get("generation") or {}).get("prompt_ids") or [1, 2, 3, 4, 5, 6, 7, 8]
    sess = ort.session(cache_model)
    tokens = generate(decode.CacheDecoder(sess), prompt, CHECK_TOKENS).tokens
    return {"model": cache_model.name, "prompt_ids": list(prompt), "tokens": tokens, "runtime": "onnxruntime CPU",
            "sampling": "greedy"}


def _versions(report: dict) -> dict:
    import onnxruntime
    import torch

    from nexus_export import __version__

    return {"nexus-export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def verify_bundle(bundle_dir: str | Path) -> dict:
    """Check every file against the manifest's sha256, then run one forward pass; errors name the failing file."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"{bundle_dir} is not a bundle: it has no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError:
        raise UserError(f"{manifest_path} is not valid JSON: the bundle is damaged") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("sha256"), dict) or not isinstance(manifest.get("sizes"), dict) \
            or not isinstance(manifest.get("model"), str):
        raise UserError(f"{manifest_path} lacks the model name, sizes or sha256 of the files: the bundle is damaged")
    for name, expected in manifest["sha256"].items():
        path = bundle_dir / name
        if not path.is_file():
            raise UserError(f"bundle file {name} is missing")
        if path.stat().st_size != manifest["sizes"].get(name):
            raise UserError(f"bundle file {name} has {path.stat().st_size} bytes, the manifest says "
                            f"{manifest['sizes'].get(name, '?')} (truncated or changed)")
        if sha256_file(path) != expected:
            raise UserError(f"bundle file {name} does not match its sha256 in the manifest (changed or corrupted)")
    from . import ort

    sess = ort.session(bundle_dir / manifest["model"])
    vocab = int(sess.get_outputs()[0].shape[-1])
    ids = np.random.default_rng(0).integers(0, vocab, (1, 16), dtype=np.int64)
    logits = ort.logits(sess, ids)
    if logits.shape != (1, 16, vocab) or not np.isfinite(logits).all():
        raise UserError(f"the bundle's model ran but gave logits of shape {logits.shape} or non-finite values")
    del sess
    result = {"files": len(manifest["sha256"]), "bytes": sum(manifest["sizes"].values()), "model": manifest["model"],
              "forward": f"1 x 16 tokens -> logits {list(logits.shape)}"}
    check = manifest.get("generation_check")
    if isinstance(check, dict):
        from . import decode

        sess = ort.session(bundle_dir / check["model"])
        tokens = generate(decode.CacheDecoder(sess), check["prompt_ids"], len(check["tokens"])).tokens
        first = next((i for i, (a, b) in enumerate(zip(tokens, check["tokens"])) if a != b), None)
        if first is not None:
            raise VerificationFailed(
                f"the greedy generation of {check['model']} differs from the tokens recorded when the bundle was made, "
                f"first at new token {first}: {tokens[first]} here, {check['tokens'][first]} recorded (a different "
                "onnxruntime or machine, or a changed model)")
        result["generation"] = f"{len(tokens)} greedy tokens from {check['model']} as recorded"
    return result
