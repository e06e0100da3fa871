"""The onnxruntime CPU runtime as the pipeline sees it: lower, open a session, measure.

Registered as the ``onnxruntime`` runtime (entry point group ``nexus_export.runtimes``); the pipeline reaches it only
through the registry. The work is done by onnx_export (lowering), onnx_check (zeros and N:M in the file), ort and parity.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from nexus_export.graph.program import Program
from passes.gptq import quantization_grids
from passes.shared.quant_grid import Grid
from passes.shared.sparsity import parse_pattern

from . import decode, genai, onnx_check, ort, parity
from .bundle import make_bundle, verify_bundle
from .onnx_export import cache_path, lower_to_onnx
from .precision import to_fp16_weights
from .quantize import quantize_onnx, write_grids, zeros_kept


class OnnxRuntimeCPU:
    name = "onnxruntime"

    @staticmethod
    def available() -> tuple[bool, str]:
        return ort.available()

    def lower(self, program: Program, out_dir: Path, opset: int = 18, external_data: bool = True,
              dtype: torch.dtype | None = None, lower: str = "both") -> Path:
        """model.onnx (and its key/value-cache twin model.kv.onnx); returns the full-sequence model's path, or the
        cache model's with ``lower="generate"``."""
        return lower_to_onnx(program, Path(out_dir) / "model.onnx", opset=opset, external_data=external_data,
                             dtype=dtype, lower=lower)

    def export(self, program: Program, path: Path) -> Path:
        """``program`` as ONNX at ``path`` (and its cache twin): float as lowered, or, for a program a GPTQ pass
        quantized, MatMulNBits computing exactly the weights it holds (its own codes and scales, float32 compute)."""
        grid = program.origin.get("quantization")
        if grid is None:
            return lower_to_onnx(program, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
            fp32 = lower_to_onnx(program, Path(tmp) / path.name)
            return write_grids(self.cache_model(fp32) or fp32, path, Grid(grid["bits"], grid["group_size"],
                                                                          grid["sym"]), quantization_grids(program))

    @staticmethod
    def cache_model(artifact: Path) -> Path | None:
        """The key/value-cache model of an artifact (itself when it is one), or None when there is none."""
        artifact = Path(artifact)
        if artifact.name.endswith(".kv.onnx"):
            return artifact
        twin = cache_path(artifact)
        return twin if twin.is_file() else None

    def decode_speed(self, decoder: decode.CacheDecoder, prompt_tokens: int = 128, new_tokens: int = 128,
                     runs: int = 3) -> dict:
        """Prefill and decode tokens per second of a key/value-cache model's decoder (batch 1, medians of ``runs``)."""
        return decode.decode_speed(decoder.sess, prompt_tokens, new_tokens, runs)

    @staticmethod
    def write_generation_config(folder: Path, cache_model: Path, hf_config, tokenizer, generation=None) -> Path:
        """genai_config.json in ``folder`` for ``cache_model``: the folder then loads in onnxruntime-genai as it is."""
        return genai.write_config(Path(folder), Path(cache_model).name, hf_config, tokenizer, generation)

    def decoder(self, cache_model: Path) -> decode.CacheDecoder:
        """A decoder (prefill, step) over a key/value-cache model, for nexus_export.generate.loop.generate."""
        return decode.CacheDecoder(self.session(cache_model))

    def session(self, artifact: Path):
        return ort.session(artifact)

    def perplexity(self, sess, windows: torch.Tensor, batch_size: int = 4, progress=None) -> tuple[float, int]:
        return ort.perplexity(sess, windows, batch_size=batch_size, progress=progress)

    def logits(self, sess, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [batch, seq, vocab] of the ONNX model for ``input_ids`` under ``attention_mask``."""
        return torch.from_numpy(ort.logits(sess, input_ids, attention_mask))

    def parity(self, expected: torch.Tensor, sess, input_ids: torch.Tensor) -> float:
        """max |expected - onnxruntime logits| on ``input_ids`` (``expected``: the program's logits on them)."""
        return parity.max_abs_diff(expected, sess, input_ids, torch.ones_like(input_ids))

    def inspect(self, artifact: Path, nm: tuple[int, int] | None, targets: set[str] | None = None) -> dict:
        layers = onnx_check.inspect_onnx(artifact, nm=nm)
        return {"summary": onnx_check.summarize(layers, targets), "layers": onnx_check.report_rows(layers, targets)}

    @staticmethod
    def check_file(path: Path, pattern: str | None, targets: set[str] | None = None
                   ) -> tuple[str | None, dict, list[dict]]:
        """check-onnx: the pattern checked ("2:4", or None for "none"), the summary and the per-layer rows (sparsity,
        N:M validity, form) of an ONNX file; ``targets``: the layers a run targeted (None: all)."""
        nm = parse_pattern(pattern)
        layers = onnx_check.inspect_onnx(path, nm=(nm.n, nm.m) if nm else None)
        return (str(nm) if nm else None), onnx_check.summarize(layers, targets), onnx_check.report_rows(layers, targets)

    @staticmethod
    def package(run_dir: Path, bundle_dir: Path, archive: bool = False, force: bool = False) -> Path:
        """A deployment bundle of a finished run folder (see bundle.py)."""
        return make_bundle(run_dir, bundle_dir, archive=archive, force=force)

    @staticmethod
    def verify(bundle_dir: Path) -> dict:
        """Every hash, one forward pass and the recorded generation of a bundle (VerificationFailed on a difference)."""
        return verify_bundle(bundle_dir)

    def latency(self, sess, batch: int, seq: int, repeats: int = 10) -> dict:
        return ort.latency_ms(sess, batch, seq, repeats=repeats)

    def variants(self, artifact: Path, recipe, targets: set[str], grids: dict | None = None) -> list[dict]:
        """The other model files a recipe asks for beside the fp32 one: fp16 weights, int4/int8 weights (round to
        nearest here, or written from ``grids``: the scales and zero points a GPTQ pass chose, by layer). Each is
        made from the key/value-cache model when there is one, so it has its cache twin too."""
        out = []
        source = self.cache_model(artifact) or artifact
        lower = recipe.lowering.lower
        if recipe.lowering.precision == "fp16":
            path = to_fp16_weights(source, artifact.with_name("model.fp16.onnx"), lower)
            out.append({"name": "fp16", "path": path.name, "bytes": self.artifact_bytes(path)})
        if recipe.quantize is not None:
            q = recipe.quantize
            dst = artifact.with_name(f"model.q{q.bits}.onnx")
            if q.method == "gptq":
                path = write_grids(source, dst, Grid(q.bits, q.group_size, q.sym), grids or {}, lower, q.head,
                                   q.accuracy_level)
            else:
                path = quantize_onnx(source, dst, q.bits, q.group_size, q.sym, lower, q.head, q.accuracy_level)
            out.append({"name": f"int{q.bits}", "path": path.name, "bytes": self.artifact_bytes(path),
                        "method": q.method, "bits": q.bits, "group_size": q.group_size, "sym": q.sym,
                        "head": q.head, "accuracy_level": q.accuracy_level,
                        **({"act_order": q.act_order, "clip_search": q.clip_search, "joint": q.joint,
                            "layers": len(grids or {})}
                           if q.method == "gptq" else {}),
                        "pruned_zeros_kept": zeros_kept(artifact, path, targets)})
        return out

    @staticmethod
    def artifact_bytes(artifact: Path) -> int:
        """Size of the ONNX file plus its external data (a cache model's data is its full-sequence twin's)."""
        artifact = Path(artifact)
        base = artifact.with_name(artifact.name.replace(".kv.onnx", ".onnx"))
        return artifact.stat().st_size + sum(p.stat().st_size for p in artifact.parent.glob(base.name + ".data*")
                                             if p.is_file())
