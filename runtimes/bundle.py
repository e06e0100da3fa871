"""Deployment bundles: a self-contained folder (optionally a .tar.gz) a deployment can ship, and its verification.

A bundle holds the deployable ONNX model and its external data, the tokenizer files, the generation config, and
``manifest.json``: input/output signature (names, dtypes, symbolic dims), opset, recipe, sparsity summary, perplexity
before/after, sizes, the sha256 of every file, and the nexus-export, torch and onnx versions. ``verify_bundle``
re-checks every hash and runs one forward pass in onnxruntime; a changed, truncated or missing file is named.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import onnx

from nexus_export.errors import UserError
from nexus_export.model_card import bundle_card
from nexus_export.outdir import sha256_file, staged_output

from .onnx_check import open_onnx

log = logging.getLogger(__name__)

FORMAT = "nexus-export-bundle/1"
MANIFEST = "manifest.json"


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
    try:
        card = bundle_card(report, model_name)
    except (KeyError, TypeError) as exc:
        raise UserError(f"{report_path} lacks {exc} (written by another version, or damaged); run the pruning "
                        "again") from None
    with staged_output(bundle_dir, force) as tmp:
        for path in sorted(run_dir.glob(model_name + "*")):
            shutil.copy2(path, tmp / path.name)
        if (run_dir / "tokenizer").is_dir():
            shutil.copytree(run_dir / "tokenizer", tmp / "tokenizer")
        if (run_dir / "recipe.yaml").is_file():
            shutil.copy2(run_dir / "recipe.yaml", tmp / "recipe.yaml")
        (tmp / "README.md").write_text(card)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT,
            "model": model_name,
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
    return {"files": len(manifest["sha256"]), "bytes": sum(manifest["sizes"].values()), "model": manifest["model"],
            "forward": f"1 x 16 tokens -> logits {list(logits.shape)}"}
