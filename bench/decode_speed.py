"""Decode speed: onnxruntime-genai's model builder against nexus-export, side by side in one run.

Rows: the builder's fp32 and int4 models (``python -m onnxruntime_genai.models.builder``, CPU, from the same Hugging
Face folder), and ours: dense, SparseGPT 2:4, ShortGPT (7 blocks removed), SliceGPT 25%, GPTQ int4, SliceGPT 25% +
GPTQ int4. Columns: the files on disk (ONNX + external data), perplexity on the evaluation windows (every model scored
the same way: its own graph in onnxruntime, an empty past), prefill tokens/s (a 128-token prompt) and decode tokens/s
(128 greedy tokens, batch 1) in onnxruntime with our decoding loop and in onnxruntime-genai with its own, each the
median of ``--runs`` runs taken round-robin across the models after a warm-up (noise hits every model alike), the
key/value cache per token, and the ratio to our dense model. Then, on our dense model: one new token through the
cache against recomputing the whole sequence, at a 512-token context.

    .venv/bin/python bench/decode_speed.py                          # ~25 min on 2 cores
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import cell, load_protocol, protocol_parser, setup_logging

from nexus_export.engine.pass_base import PassContext
from nexus_export.generate.loop import generate
from nexus_export.models.zoo import cache_root
from nexus_export.registry import get_pass
from passes.gptq import quantization_grids
from passes.shared.quant_grid import Grid
from runtimes import genai, ort
from runtimes.decode import CacheDecoder, kv_bytes_per_token
from runtimes.onnx_export import cache_path, lower_to_onnx
from runtimes.quantize import write_grids

PROMPT, NEW = 128, 128


def files_mib(model: Path) -> float:
    """The ONNX file and every external data file it reads (a cache model's is its full-sequence twin's)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    data = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    return (model.stat().st_size + sum((model.parent / d).stat().st_size for d in data)) / 2**20


def builder(hf_folder: Path, out: Path, precision: str, cache: Path) -> Path:
    """onnxruntime-genai's model builder on ``hf_folder`` (CPU, ``precision``); its model path. Its past inputs
    leave the head size symbolic; the value from its genai_config.json is written into their shapes (metadata only)
    so the same harness feeds its empty past."""
    import json

    import onnx

    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o", str(out),
                    "-p", precision, "-e", "cpu", "-c", str(cache)], check=True, capture_output=True)
    print(f"builder {precision}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    head_size = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            value.type.tensor_type.shape.dim[3].dim_value = head_size
    onnx.save(model, str(out / "model.onnx"))
    return out / "model.onnx"


def genai_folder(model: Path, loaded) -> None:
    """Make ``model.parent`` loadable by onnxruntime-genai (our cache model, config and tokenizer)."""
    loaded.tokenizer.save_pretrained(model.parent)
    genai.write_config(model.parent, model.name, loaded.model.config, loaded.tokenizer)


def genai_run(folder: Path, prompt: list[int]) -> tuple[float, float]:
    """Prefill and decode tokens/s of one greedy generation through onnxruntime-genai."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + NEW, min_length=len(prompt) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(prompt)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    steps = 0
    while not gen.is_done():
        gen.generate_next_token()
        steps += 1
    return len(prompt) / prefill, steps / (time.perf_counter() - start)


def cache_against_recompute(full: Path, kv: Path, context: int = 512, repeats: int = 5) -> tuple[float, float]:
    """ms for one new token at ``context``: recomputing every position (full-sequence model) and through the cache."""
    full_sess, kv_sess = ort.session(full), ort.session(kv)
    ids = np.random.default_rng(0).integers(0, 1000, (1, context), dtype=np.int64)
    decoder = CacheDecoder(kv_sess)
    recompute, cached = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        ort.logits(full_sess, ids)
        recompute.append(time.perf_counter() - start)
        decoder.prefill(ids[0, :-1].tolist())
        start = time.perf_counter()
        decoder.step(int(ids[0, -1]))
        cached.append(time.perf_counter() - start)
    return statistics.median(recompute[1:]) * 1000, statistics.median(cached[1:]) * 1000


def main() -> int:
    ap = protocol_parser(__doc__.splitlines()[0])
    ap.set_defaults(eval_windows=16)
    ap.add_argument("--runs", type=int, default=3, help="timed generations per model (medians)")
    ap.add_argument("--remove", type=int, default=7)
    ap.add_argument("--slicing", type=float, default=0.25)
    ap.add_argument("--group-size", type=int, default=32)
    args = ap.parse_args()
    setup_logging()
    if not genai.available()[0]:
        raise SystemExit(f"this benchmark needs onnxruntime-genai: {genai.available()[1]}")
    loaded, dense, evals, calib = load_protocol(args.model, args.eval_windows, args.calib_samples, args.seq_len,
                                                args.calib_source)
    hf_folder = loaded.files[0].parent if loaded.files else cache_root() / "models" / args.model
    ctx = PassContext(calibration_windows=calib)
    gptq = {"bits": 4, "group_size": args.group_size}
    group_sizes: dict[str, int] = {}
    models: dict[str, Path] = {}  # name -> cache model (generation); scored through its own graph
    pass_s: dict[str, float] = {}

    def run(program, name: str, options: dict, label: str):
        result = get_pass(name)(options).run(program, ctx)
        pass_s[label] = pass_s.get(label, 0.0) + result.report.wall_s
        return result.program

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for precision in ("fp32", "int4"):
            models[f"builder {precision}"] = builder(hf_folder, tmp / f"builder-{precision}", precision,
                                                     tmp / "builder-cache")
        shutil.rmtree(tmp / "builder-cache", ignore_errors=True)

        def ours(program, label: str, quantize: str | None = None) -> None:
            folder = tmp / label.replace(" ", "-").replace("%", "")
            full = lower_to_onnx(program, folder / "model.onnx")
            if quantize:  # groups of 32, or of 16 where a sliced width is not a multiple of 32 (432 at 25%)
                widths = {lin.in_features for lin in program.structure.linears.values()}
                size = args.group_size if all(w % args.group_size == 0 for w in widths) else 16
                group_sizes[quantize] = size
                program = run(program, "gptq", {**gptq, "group_size": size}, quantize)
                full = lower_to_onnx(program, folder / "float" / "model.onnx")
                full = write_grids(cache_path(full), folder / "model.q4.onnx", Grid(4, size),
                                   quantization_grids(program), head=True, accuracy_level=4)
                shutil.rmtree(folder / "float")
            models[quantize or label] = cache_path(full)
            genai_folder(cache_path(full), loaded)

        ours(dense, "dense fp32")
        ours(run(dense.fork(), "sparsegpt", {"pattern": "2:4"}, "SparseGPT 2:4"), "SparseGPT 2:4")
        ours(run(dense.fork(), "shortgpt", {"remove": args.remove}, f"ShortGPT -{args.remove}"),
             f"ShortGPT -{args.remove}")
        sliced = run(dense.fork(), "slicegpt", {"slicing": args.slicing}, f"SliceGPT {args.slicing:.0%}")
        ours(sliced, f"SliceGPT {args.slicing:.0%}")
        ours(dense.fork(), "dense gptq", "GPTQ int4")
        pass_s[f"SliceGPT {args.slicing:.0%} + GPTQ int4"] = pass_s[f"SliceGPT {args.slicing:.0%}"]
        ours(sliced, "sliced gptq", f"SliceGPT {args.slicing:.0%} + GPTQ int4")
        del sliced

        prompt = np.random.default_rng(0).integers(0, 1000, PROMPT).tolist()
        ppl, speed, genai_speed, sizes, cache = {}, {name: [] for name in models}, {name: [] for name in models}, {}, {}
        sessions = {}
        for name, path in models.items():
            sessions[name] = ort.session(path, threads=2)
            ppl[name] = ort.perplexity(sessions[name], evals, batch_size=1)[0]
            sizes[name] = files_mib(path)
            cache[name] = kv_bytes_per_token(sessions[name])
            generate(CacheDecoder(sessions[name]), prompt, 8)  # warm-up
            print(f"{name}: perplexity {ppl[name]:.2f}, {sizes[name]:.1f} MiB", file=sys.stderr)
        for _ in range(args.runs):
            for name, sess in sessions.items():
                g = generate(CacheDecoder(sess), prompt, NEW)
                speed[name].append((g.prefill_tokens_per_s, g.decode_tokens_per_s))
        sessions.clear()
        for name, path in models.items():
            genai_run(path.parent, prompt)  # warm-up
        for _ in range(args.runs):
            for name, path in models.items():
                genai_speed[name].append(genai_run(path.parent, prompt))
        recompute_ms, cached_ms = cache_against_recompute(models["dense fp32"].with_name("model.onnx"),
                                                          models["dense fp32"])

    med = {name: tuple(statistics.median(v[i] for v in runs) for i in (0, 1)) for name, runs in speed.items()}
    gmed = {name: tuple(statistics.median(v[i] for v in runs) for i in (0, 1)) for name, runs in genai_speed.items()}
    base = med["dense fp32"][1]
    print(f"{args.model}: onnxruntime CPU (2 threads), batch 1, a {PROMPT}-token prompt then {NEW} greedy tokens, "
          f"median of {args.runs} runs round-robin across the models; perplexity on {len(evals)} evaluation windows x "
          f"{args.seq_len} tokens; int4 = MatMulNBits with int8 activations (accuracy level 4), the embedding and head on the "
          f"grid too, groups of {args.group_size} (of 16 for: {', '.join(k for k, v in group_sizes.items() if v == 16) or 'none'})\n")
    print("| model | files MiB | perplexity | prefill tok/s | decode tok/s | decode x our dense | genai prefill tok/s | "
          "genai decode tok/s | cache KiB/token | pass s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in models:
        print(f"| {name} | {sizes[name]:.1f} | {ppl[name]:.2f} | {med[name][0]:.0f} | {med[name][1]:.1f} | "
              f"{med[name][1] / base:.2f}x | {gmed[name][0]:.0f} | {gmed[name][1]:.1f} | {cache[name] / 1024:.1f} | "
              f"{cell(pass_s.get(name), '.0f')} |")
    print(f"\nOne new token at a 512-token context, our dense model: {recompute_ms:.1f} ms recomputing every position, "
          f"{cached_ms:.1f} ms through the cache ({recompute_ms / cached_ms:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
