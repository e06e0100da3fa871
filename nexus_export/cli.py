"""The nexus-export command line: prune, sweep, compare, run, generate, inspect, check-onnx, package, verify, build-engine.

``build-engine`` needs TensorRT and a GPU. Bad input ends with one line on stderr and exit code 2, and no output folder left behind.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from nexus_export.cli_flags import SWEEP_AXES, pass_flags, pass_options
from nexus_export.errors import UserError, VerificationFailed
from nexus_export.registry import get_runtime

if TYPE_CHECKING:
    from nexus_export.run.recipe import Recipe

log = logging.getLogger("nexus_export.cli")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (a UserError), like every other bad input."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nexus-export", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model, lower it to ONNX, evaluate and report",
                           epilog="example: nexus-export prune --model smollm2-135m --method sparsegpt --pattern 2:4 "
                                  "--out out/sg24")
    _prune_args(prune, sweep=False)
    _output_args(prune)

    sweep = sub.add_parser("sweep", help="prune at several sparsities (or removals, slicings): a run folder per "
                                         "point, a table and a plot",
                           epilog="example: nexus-export sweep --model smollm2-135m --method wanda --sparsities "
                                  "0.3,0.5,0.7 --out out/sweep")
    _prune_args(sweep, sweep=True)
    _output_args(sweep, resume=False)

    compare = sub.add_parser("compare", help="side-by-side table (and plot) of finished run folders",
                             epilog="example: nexus-export compare out/mag24 out/sg24   (add --out DIR for the "
                                    "plot, HTML and Markdown)")
    compare.add_argument("run_dirs", nargs="+", help="run folders written by prune or run; a sweep folder stands for "
                                                     "its points")
    compare.add_argument("--out", help="also write compare.md, compare.html, compare.json and plots/ into this "
                                       "folder (without it: the table on stdout only)")
    compare.add_argument("--force", action="store_true", help="replace a non-empty output folder when done")

    run = sub.add_parser("run", help="run a recipe (YAML)", epilog="example: nexus-export run recipe.yaml --out "
                                                                   "out/run")
    run.add_argument("recipe", help="recipe YAML file")
    _output_args(run)

    gen = sub.add_parser("generate", help="generate text from a run folder, a bundle or a model (streamed to stdout)",
                         epilog="example: nexus-export generate out/demo --prompt 'It is a truth universally' "
                                "--max-new-tokens 48")
    gen.add_argument("source", nargs="?", help="run folder (prune/run output) or bundle")
    gen.add_argument("--model", help="instead of a folder: a zoo name or Hugging Face folder (the dense model)")
    gen.add_argument("--prompt", help="the text to continue")
    gen.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (64)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 (default): greedy; above 0: sample at this temperature")
    gen.add_argument("--top-p", type=float, default=1.0, help="sampling: keep the smallest set of tokens whose "
                                                              "probability reaches this (1.0: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling: the random seed (0)")
    gen.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "genai", "pytorch"),
                     help="onnxruntime (default: the key/value-cache ONNX model), genai (onnxruntime-genai loads the "
                          "folder), pytorch (the run's hf/ folder, or the --model)")

    inspect = sub.add_parser("inspect", help="show blocks, linears with roles, parameter counts",
                             epilog="example: nexus-export inspect smollm2-135m")
    inspect.add_argument("model", help="zoo name or local HF model folder")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")

    engine = sub.add_parser("build-engine", help="build a TensorRT engine (FP16, 2:4 sparse weights) from an ONNX file",
                            epilog="example: nexus-export build-engine out/sg24/model.onnx --out out/engine")
    engine.add_argument("onnx", help="path of a .onnx file (e.g. DIR/model.onnx of a 2:4 run)")
    engine.add_argument("--int8", action="store_true", help="also allow INT8 kernels")
    engine.add_argument("--no-fp16", action="store_true", help="FP32 only")
    engine.add_argument("--no-sparse", action="store_true", help="do not enable 2:4 sparse weights")
    engine.add_argument("--max-batch", type=int, default=8, help="largest batch of the optimization profile (8)")
    engine.add_argument("--max-seq", type=int, default=512, help="longest sequence of the optimization profile (512)")
    engine.add_argument("--timing-cache", help="timing cache file to reuse and update")
    _output_args(engine)

    package = sub.add_parser("package", help="package a finished run folder as a deployment bundle",
                             epilog="example: nexus-export package out/sg24 --out out/bundle --archive")
    package.add_argument("run_dir", help="output folder of prune/run (holds report.json and the ONNX model)")
    package.add_argument("--out", required=True, help="bundle folder (must not exist or be empty)")
    package.add_argument("--archive", action="store_true", help="also write BUNDLE.tar.gz")
    package.add_argument("--force", action="store_true", help="replace a non-empty bundle folder")

    verify = sub.add_parser("verify", help="re-check a bundle's hashes, run one forward pass and its recorded "
                                           "greedy generation", epilog="example: nexus-export verify out/bundle")
    verify.add_argument("bundle", help="bundle folder")

    check = sub.add_parser("check-onnx", help="per-layer sparsity and N:M validity of an ONNX file",
                           epilog="example: nexus-export check-onnx out/sg24/model.onnx --tensorrt --strict")
    check.add_argument("onnx", help="path of a .onnx file")
    check.add_argument("--pattern", default="2:4", help="N:M pattern to check (default 2:4; 'none' to skip)")
    check.add_argument("--tensorrt", action="store_true", help="judge each layer against TensorRT's 2:4 rules")
    check.add_argument("--strict", action="store_true", help="exit 1 when a targeted layer fails the check")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _prune_args(prune: argparse.ArgumentParser, sweep: bool) -> None:
    """The options of ``prune``; a sweep takes a list for the setting it varies (--sparsities, --remove, --slicings)."""
    prune.add_argument("--model", required=True, help="zoo name (tiny-llama, smollm2-135m) or local HF model folder")
    prune.add_argument("--convert-pickled", action="store_true",
                       help="a folder with only pytorch_model*.bin weights: convert them once to safetensors in the "
                            "cache with PyTorch's weights-only loader (no code runs), and use that copy")
    prune.add_argument("--method", required=True,
                       help="pruning pass, e.g. magnitude; none for the dense model (with --quantize-bits 4: "
                            "quantization only)")
    if sweep:
        prune.add_argument("--sparsities", help="masking methods: the sparsities to run, e.g. 0.3,0.5,0.6,0.7")
        prune.add_argument("--remove", help="shortgpt: the numbers of blocks to remove, e.g. 2,4,7")
        prune.add_argument("--slicings", help="slicegpt: the slicing fractions, e.g. 0.1,0.2,0.3")
    for flag, spec in pass_flags().items():
        if sweep and spec.field in SWEEP_AXES and not spec.prefix:
            continue  # the sweep's list flag stands for it
        prune.add_argument(flag, dest=spec.dest, help=spec.help, **spec.argparse)
    prune.add_argument("--save-hf", action="store_true", help="also write a Hugging Face folder to DIR/hf")
    prune.add_argument("--quantize-bits", type=int,
                       help="then quantize the MatMul weights (gptq: the block linears) to 4 or 8 bits: model.q4.onnx "
                            "(gptq at 8 bits needs float32 weights: --dtype fp32 on a bf16 or fp16 checkpoint)")
    prune.add_argument("--quantize-method", choices=("gptq", "rtn"),
                       help="gptq: error-compensated on the calibration data (default when the method calibrates); "
                            "rtn: round to nearest (default otherwise)")
    prune.add_argument("--group-size", "--block-size", dest="group_size", type=int,
                       help="inputs per quantization scale: 32 (default), 64, 128")
    prune.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                       help="gptq: quantize columns in decreasing Hessian diagonal order (default, except in the joint "
                            "sparsegpt sweep)")
    prune.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                       help="gptq: shrink each group's range where that rounds its weights closer (default); "
                            "--no-clip-search: the whole range, as the GPTQ reference")
    prune.add_argument("--quantize-sym", action=argparse.BooleanOptionalAction, default=None,
                       help="symmetric grid (default); --no-quantize-sym: a zero point per group")
    prune.add_argument("--quantize-head", action=argparse.BooleanOptionalAction, default=None,
                       help="also the token embedding and lm_head, round to nearest; a tied pair stays one tensor "
                            "(default); --no-quantize-head keeps them float")
    prune.add_argument("--accuracy-level", type=int,
                       help="MatMulNBits compute: 4 (default) int8 activations, onnxruntime's fastest on CPUs; 0 "
                            "float32 (the PyTorch program's arithmetic)")
    prune.add_argument("--joint", action="store_true",
                       help="gptq: prune (sparsegpt or wanda) and quantize each layer in one sweep")
    prune.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx with float16 weights")
    prune.add_argument("--bos", default="auto", choices=("auto", "always", "never"),
                       help="start every calibration and evaluation window with the tokenizer's BOS token; auto "
                            "(default): when the tokenizer adds one or the model family needs one (Gemma)")
    prune.add_argument("--calib-source", default="austen",
                       help="calibration text: austen, a .txt file or folder, or a mix such as austen:0.5,FILE:0.5 "
                            "(each source gives that share of the windows)")
    prune.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default 64)")
    prune.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration window offsets (0)")
    prune.add_argument("--eval-source", default="austen", help="evaluation text: austen, a .txt file or folder")
    prune.add_argument("--eval-windows", type=int, default=64, help="evaluation windows (default 64)")
    prune.add_argument("--seq-len", type=int, default=512, help="tokens per calibration/evaluation window (512)")
    prune.add_argument("--no-latency", action="store_true", help="skip the onnxruntime latency measurement")
    prune.add_argument("--no-decode-speed", action="store_true",
                       help="skip the decode speed (prefill and decode tokens/s of the pruned and dense models) and "
                            "the sample continuation")
    prune.add_argument("--lower", default="both", choices=("both", "logits", "generate"),
                       help="which ONNX models to write: both (default): model.onnx (full sequence -> logits, for "
                            "scoring and TensorRT) and model.kv.onnx (key/value cache, for generation); or one")
    prune.add_argument("--onnx-eval", choices=("auto", "on", "off"), default="auto",
                       help="evaluate the ONNX model in onnxruntime (auto: when it fits the memory budget)")
    prune.add_argument("--eval-runtime", default="pytorch",
                       help="pytorch, onnxruntime or both: which runtime scores the pruned model on every window "
                            "(default pytorch; onnxruntime then checks logits and perplexity on a few parity windows)")
    prune.add_argument("--eval-tasks", help="lm-eval tasks for zero-shot accuracy of the dense and pruned model, e.g. "
                                            "hellaswag,arc_easy (needs the eval extra)")
    prune.add_argument("--eval-limit", type=int, help="examples per lm-eval task (default: all)")
    prune.add_argument("--eval-include", help="folder of local lm-eval task YAML files (adds to lm-eval's tasks)")
    prune.add_argument("--no-eval-cache", action="store_true",
                       help="evaluate the dense model even when an earlier run cached its perplexity")
    prune.add_argument("--device", default="auto", help="where blocks run: auto (CUDA when present), cpu, cuda, cuda:N")
    prune.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="dtype of the weights in every output (auto: the checkpoint's)")
    prune.add_argument("--memory-budget", default="auto",
                       help="weights the run keeps in memory, e.g. 8GiB (edits past it spill to a scratch file); "
                            "auto: 2GiB, or one decoder block of the model where that is more, within free memory")


def _output_args(parser: argparse.ArgumentParser, resume: bool = True) -> None:
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder when done")
    if resume:
        parser.add_argument("--resume", action="store_true",
                            help="continue an interrupted calibrated run from its last finished block")
        parser.add_argument("--bundle", help="also package the result as a deployment bundle in this folder")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except UserError as exc:
        print(f"nexus-export: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    for noisy in ("torch", "onnxscript", "onnx_ir", "transformers", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    logging.getLogger("torch.onnx").setLevel(max(level, logging.ERROR))  # "torchvision is not installed" notes
    main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None  # SIGTERM unwinds like Ctrl-C
    if main_thread and hasattr(signal, "SIGXFSZ"):  # past a file-size limit a write fails (EFBIG) and is reported,
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # instead of the signal killing the process mid-write
    try:
        commands = {"prune": _prune, "sweep": _sweep, "compare": _compare, "run": _run, "generate": _generate,
                    "inspect": _inspect,
                    "check-onnx": _check_onnx, "build-engine": _build_engine, "package": _package, "verify": _verify}
        return commands[args.command](args)
    except UserError as exc:
        print(f"nexus-export: error: {_rank_prefix()}{_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, _Terminated)
        print(f"nexus-export: {'terminated' if terminated else 'interrupted'}; no output written", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # the last line of defence: a bug, said in one line (the traceback with -v)
        full = _disk_full(exc)
        if full is not None:
            print(f"nexus-export: error: {full}", file=sys.stderr)
            return 1
        if args.verbose:
            traceback.print_exc()
        print(f"nexus-export: internal error: {_rank_prefix()}{type(exc).__name__}: {_one_line(exc)} (run with -v "
              "for the traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _disk_full(exc: BaseException) -> str | None:
    """One line for a write that failed for want of room (a full disk, a quota, a file-size limit), wherever it
    happened and however a library wrapped it; None for any other failure."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            where = f" {seen.filename}" if seen.filename else ""
            return (f"could not write{where}: {seen.strerror}; free disk space (or raise the file-size limit) and run "
                    "again; nothing was written")
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for marker in ("No space left on device", "File too large", "Disk quota exceeded",
                   "Not enough free space"):  # the last: numpy's tofile, with no errno
        if marker in text:
            return (f"could not write the output: {marker}; free disk space (or raise the file-size limit) and run "
                    "again; nothing was written")
    if isinstance(exc, OSError) and re.search(r"\d+ requested and \d+ written", text):  # a short write: no room
        return ("could not write the output: File too large or no space left (a write stopped short); free disk "
                "space (or raise the file-size limit) and run again; nothing was written")
    return None


def _rank_prefix() -> str:
    """``rank R of N: `` when torchrun started this process as one of several (errors name the failing rank)."""
    from nexus_export.distributed import prefix

    return prefix()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that everything unwinds (and cleans up) as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise _Terminated()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__


def _prune(args: argparse.Namespace) -> int:
    return _execute(_prune_recipe(args), args)


def _prune_recipe(args: argparse.Namespace) -> "Recipe":
    """The recipe the prune options describe (validated)."""
    from nexus_export.run.recipe import Recipe

    options, activation = pass_options(args)
    if args.method == "none":  # no pass: the dense model lowered, quantized (--quantize-bits) or thresholded
        if options:
            raise UserError(f"--method none runs no pass, so it takes no pass options; got "
                            f"{', '.join('--' + name.replace('_', '-') for name in options)}")
        passes = [{"activation": activation}] if activation else []
    elif args.method == "activation":
        passes = [{"activation": {**options, **activation}}]
    elif activation:
        if "sparsity" not in activation:
            raise UserError("--activation-roles and --activation-allocation need --activation-sparsity (or --method "
                            "activation)")
        passes = [{args.method: options}, {"activation": activation}]
    else:
        passes = [{args.method: options}]
    recipe = Recipe.from_dict({
        "model": args.model,
        "passes": passes,
        "calibration": {"source": args.calib_source, "samples": args.calib_samples, "seq_len": args.seq_len,
                        "seed": args.calib_seed},
        "evaluation": {"source": args.eval_source, "windows": args.eval_windows, "seq_len": args.seq_len,
                       "latency": not args.no_latency, "decode_speed": not args.no_decode_speed,
                       "onnx": args.onnx_eval, "runtime": args.eval_runtime,
                       "cache": not args.no_eval_cache, "tasks": _task_names(args.eval_tasks),
                       "task_limit": args.eval_limit, "task_paths": [args.eval_include] if args.eval_include else None},
        "execution": {"device": args.device, "dtype": args.dtype, "memory_budget": args.memory_budget},
        "lowering": {"save_hf": args.save_hf, "precision": "fp16" if args.fp16 else "fp32", "lower": args.lower},
        "bos": args.bos,
        "convert_pickled": args.convert_pickled,
        **_quantize_options(args),
    })
    return recipe


def _task_names(text: str | None) -> list[str] | None:
    from nexus_export.run.sweep import parse_values

    return None if text is None else parse_values(text, "eval-tasks", str)


def _quantize_options(args: argparse.Namespace) -> dict:
    """The recipe's quantize section from the flags; a quantization flag without --quantize-bits is an error."""
    given = {"method": args.quantize_method, "group_size": args.group_size, "sym": args.quantize_sym,
             "act_order": args.act_order, "clip_search": args.clip_search, "joint": args.joint or None,
             "head": args.quantize_head, "accuracy_level": args.accuracy_level}
    given = {k: v for k, v in given.items() if v is not None}
    if args.quantize_bits is None:
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise UserError(f"{flags} set how to quantize, but nothing is quantized: add --quantize-bits 4 (or 8)")
        return {}
    return {"quantize": {"bits": args.quantize_bits, **given}}


def _sweep(args: argparse.Namespace) -> int:
    from nexus_export.distributed import launched
    from nexus_export.run.pipeline import run_recipe
    from nexus_export.run.sweep import plan, run_sweep

    _prepare_process()

    if launched():
        raise UserError("a sweep runs in one process: launch `nexus-export sweep` without torchrun (or run each point "
                        "with `torchrun ... nexus-export prune`)")
    given = [axis for axis in ("sparsities", "remove", "slicings") if getattr(args, axis) is not None]
    if len(given) != 1:
        raise UserError("a sweep varies one setting: give exactly one of --sparsities (masking methods), --remove "
                        "(shortgpt) or --slicings (slicegpt)" + (f"; got {', '.join('--' + g for g in given)}"
                                                                  if given else ""))
    axis = given[0]

    def make_recipe(option: str, value):
        point = argparse.Namespace(**{**vars(args), **{f"pass_{name}": None for name in SWEEP_AXES},
                                      f"pass_{option}": value})
        return _prune_recipe(point)

    points = plan(axis, getattr(args, axis), make_recipe)
    summary = run_sweep(points, axis, args.out, args.force, lambda recipe, out: run_recipe(recipe, out))
    from nexus_export.reporting.compare import load_run, row, text_table

    rows = [row(p["run"], load_run(Path(args.out) / p["run"])) for p in summary["points"] if p["ok"]]
    print(text_table(rows))
    failed = [p for p in summary["points"] if not p["ok"]]
    for p in failed:
        print(f"{summary['axis']} {p['value']} failed: {p['error']}")
    print(f"sweep in {args.out}: sweep.html, sweep.md, sweep.json, plots/, a run folder per point")
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> int:
    from nexus_export.outdir import check_output_dir, staged_output
    from nexus_export.reporting.compare import load_runs, row, text_table, write_comparison

    reports = load_runs(args.run_dirs)
    out = check_output_dir(args.out, args.force) if args.out else None
    rows = [row(name, report) for name, report in reports]
    if out is not None:
        with staged_output(out, args.force) as tmp:
            write_comparison(rows, tmp, f"comparison of {len(rows)} runs")
    print(text_table(rows))
    if out is not None:
        print(f"comparison in {args.out}: compare.html, compare.md, compare.json, plots/")
    return 0


def _run(args: argparse.Namespace) -> int:
    from nexus_export.run.recipe import Recipe

    return _execute(Recipe.from_yaml(args.recipe), args)


def _prepare_process() -> None:
    """Process-wide settings a run of the command line owns: large allocations mapped on their own (freed memory
    goes back to the system) and the imports' objects frozen out of every later garbage collection."""
    from nexus_export.memory import freeze_imports, map_large_allocations

    map_large_allocations()
    freeze_imports()


def _execute(recipe, args: argparse.Namespace) -> int:
    from nexus_export.reporting.report_text import generation_lines, headline
    from nexus_export.run.pipeline import run_recipe

    _prepare_process()

    if args.bundle is not None:
        from nexus_export.outdir import check_distinct, check_output_dir

        bundle = check_output_dir(args.bundle, False, "--bundle")
        check_distinct(check_output_dir(args.out, args.force), bundle, ("--out", "--bundle"))
    report = run_recipe(recipe, args.out, force=args.force, resume=args.resume)
    if report is None:  # a rank other than 0 of a distributed run: rank 0 writes and says what it wrote
        return 0
    print(headline(report))
    for variant in report["artifacts"]:
        ppl = variant["perplexity"]
        print(f"  {variant['path']}: {variant['bytes'] / 2**20:.1f} MiB, onnxruntime "
              + (f"perplexity {ppl:.2f}" if ppl is not None else f"perplexity: {report['perplexity']['onnx_eval']}"))
    for line in generation_lines(report):
        print(line)
    print(f"artifacts in {args.out}: report.html, report.md, report.json, plots/, recipe.yaml, tokenizer files"
          + (", genai_config.json" if (Path(args.out) / "genai_config.json").is_file() else ""))
    if args.bundle:
        get_runtime("onnxruntime").package(Path(args.out), Path(args.bundle))
        print(f"bundle: {args.bundle}")
    return 0


def _package(args: argparse.Namespace) -> int:
    bundle = get_runtime("onnxruntime").package(Path(args.run_dir), Path(args.out), archive=args.archive,
                                                force=args.force)
    print(f"bundle {bundle}" + (f" and {bundle.with_suffix('.tar.gz')}" if args.archive else ""))
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        result = get_runtime("onnxruntime").verify(Path(args.bundle))
    except VerificationFailed as exc:
        print(f"nexus-export: verify failed: {exc}", file=sys.stderr)
        return 1
    print(f"bundle {args.bundle} verified: {result['files']} files ({result['bytes'] / 2**20:.1f} MiB) match the "
          f"manifest; {result['model']}: {result['forward']}"
          + (f"; {result['generation']}" if result.get("generation") else ""))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from nexus_export.generate.loop import Sampling
    from nexus_export.generate.text import generate_text

    if (args.source is None) == (args.model is None):
        raise UserError("give a run folder or bundle, or --model NAME (the dense model), not both")
    if (args.prompt is None) == (args.prompt_file is None):
        raise UserError("give the text to continue with --prompt TEXT or --prompt-file FILE (one of them)")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.source is not None and not Path(args.source).is_dir():
        raise UserError(f"{args.source} is not a folder: give a run folder (prune/run output) or a bundle")
    if args.source is not None and not any((Path(args.source) / f).is_file() for f in ("report.json",
                                                                                      "manifest.json")):
        raise UserError(f"{args.source} holds no report.json or manifest.json, so it is neither a run folder nor a "
                        "bundle; for a model folder use --model FOLDER")
    prompt = args.prompt if args.prompt is not None else _read_prompt(Path(args.prompt_file))
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    shown = []  # the prompt goes out with the first piece: a refusal before it leaves stdout empty

    def show(piece: str) -> None:
        sys.stdout.write(piece if shown else prompt + piece)
        sys.stdout.flush()
        shown.append(True)

    result = generate_text(args.source or args.model, prompt, args.max_new_tokens, args.runtime, sampling, show)
    sys.stdout.write(("" if shown else prompt) + "\n")
    print(f"{args.runtime}: {result.speed_line()}", file=sys.stderr)
    return 0


def _read_prompt(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--prompt-file {path} does not exist") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompt-file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"cannot read --prompt-file {path}: {exc.strerror or exc}") from None


def _inspect(args: argparse.Namespace) -> int:
    from nexus_export.graph.program import Program
    from nexus_export.models.zoo import open_model

    loaded = open_model(args.model)
    program = Program.from_loaded(loaded)
    s = program.structure
    if args.json:
        rows = [dict(name=l.name, role=l.role, block=l.block, in_features=l.in_features, out_features=l.out_features)
                for l in s.linears.values()]
        print(json.dumps({"summary": s.summary(), "parameters": program.num_parameters(), "linears": rows}, indent=2))
        return 0
    print(f"{loaded.name}: {len(s.blocks)} blocks ({s.block_list}), {program.num_parameters():,} parameters, "
          f"tied embedding: {s.tied_embedding}")
    print(f"embeddings: {', '.join(s.embeddings)}; final norm: {s.final_norm}")
    post = sum(1 for sub in s.sublayers if sub.post_norm)
    print(f"sublayers: {', '.join(sorted({sub.kind for sub in s.sublayers}))}"
          + (f"; {post} with a norm after the sublayer (slicegpt refuses these)" if post else "")
          + (f"; after the lm_head: {', '.join(s.head_postprocess)}" if s.head_postprocess else ""))
    print(f"{'linear':<48} {'role':<9} {'block':>5} {'in':>6} {'out':>6} {'params':>10}")
    for lin in s.linears.values():
        block = "-" if lin.block is None else str(lin.block)
        print(f"{lin.name:<48} {lin.role:<9} {block:>5} {lin.in_features:>6} {lin.out_features:>6} "
              f"{lin.in_features * lin.out_features:>10,}")
    return 0


def _check_onnx(args: argparse.Namespace) -> int:
    if args.tensorrt:
        return _check_tensorrt(args)
    targets = _report_targets(Path(args.onnx))
    pattern, summary, rows = get_runtime("onnxruntime").check_file(Path(args.onnx), args.pattern, targets)
    if args.json:
        print(json.dumps({"summary": summary, "layers": rows}, indent=2))
        return 1 if args.strict and pattern and not summary["all_nm_valid"] else 0
    label = pattern or "N:M"
    print(f"{'layer':<48} {'op':<6} {'k':>6} {'n':>6} {'sparsity':>9} {label + ' valid':>10} {'form':<10} targeted")
    for row in rows:
        valid = "-" if row["nm_valid"] is None else ("yes" if row["nm_valid"] else "NO")
        print(f"{row['layer']:<48} {row['op']:<6} {row['k']:>6} {row['n']:>6} {row['sparsity']:>9.1%} {valid:>10} "
              f"{row['form']:<10} {'yes' if row['targeted'] else 'no'}")
    scope = "from report.json" if targets is not None else "all layers (no report.json beside the file)"
    line = (f"{summary['layers']} layers, weight sparsity {summary['sparsity']:.1%}; "
            f"{summary['targeted_layers']} targeted layers ({scope})")
    if pattern:
        line += (f": all {label}-valid" if summary["all_nm_valid"] else
                 f": {summary['nm_valid_layers']} {label}-valid, not valid: {', '.join(summary['nm_invalid'][:5])}")
    print(line)
    return 1 if args.strict and pattern and not summary["all_nm_valid"] else 0


def _check_tensorrt(args: argparse.Namespace) -> int:
    tensorrt = get_runtime("tensorrt")
    targets = _report_targets(Path(args.onnx))
    summary, rows = tensorrt.check_file(Path(args.onnx), targets)
    failed = args.strict and not summary["targets_all_eligible"]
    if args.json:
        print(json.dumps({"summary": summary, "layers": tensorrt.rows_as_dicts(rows)}, indent=2))
        return 1 if failed else 0
    print(f"{'layer':<48} {'op':<6} {'K':>6} {'N':>6} {'2:4 groups':>10} {'K%4':>4} {'N%4':>4} {'form':<10} "
          f"{'eligible':>8} {'>=256':>5}")
    for r in rows:
        yes = lambda flag: "yes" if flag else "NO"  # noqa: E731
        print(f"{r.layer:<48} {r.op:<6} {r.k:>6} {r.n:>6} {yes(r.groups_2_4):>10} {yes(r.k_multiple_of_4):>4} "
              f"{yes(r.n_multiple_of_4):>4} {r.form:<10} {yes(r.eligible):>8} {'yes' if r.likely_sparse else 'no':>5}")
    scope = "from report.json" if targets is not None else "all layers"
    print(f"TensorRT 2:4: {summary['eligible']} of {summary['layers']} layers eligible, {summary['likely_sparse']} of "
          f"them >= 256 channels; targeted ({scope}): {summary['targeted_eligible']} of {summary['targeted']} eligible"
          + (f"; not eligible: {', '.join(summary['targeted_ineligible'][:5])}" if summary["targeted_ineligible"] else ""))
    if any(r.form == "quantized" for r in rows):
        print("this file holds MatMulNBits weights, which TensorRT does not build: check the float model.onnx of the "
              "same run")
    elif not summary["eligible"]:
        print("no layer is eligible for TensorRT sparse tactics: prune with --pattern 2:4 first")
    return 1 if failed else 0


def _build_engine(args: argparse.Namespace) -> int:
    from nexus_export.outdir import staged_output
    from nexus_export.reporting.report import write_json

    tensorrt = get_runtime("tensorrt")
    ok, why = tensorrt.available()
    if not ok:
        raise UserError(why)
    if not Path(args.onnx).is_file():
        raise UserError(f"no ONNX file at {args.onnx}")
    with staged_output(args.out, args.force) as tmp:
        build, parity = tensorrt.build(Path(args.onnx), tmp, args.max_batch, args.max_seq, fp16=not args.no_fp16,
                                       int8=args.int8, sparse=not args.no_sparse, timing_cache=args.timing_cache)
        write_json({"build": build.to_dict(), "parity_vs_onnxruntime": parity}, tmp / "report.json")
    print(f"engine {Path(args.out) / 'model.engine'}: built in {build.build_s:.0f} s; {len(build.eligible_layers)} "
          f"layers eligible for sparse math, sparse tactics picked for {len(build.sparse_layers)}; "
          f"max |logits diff| vs onnxruntime {parity['max_abs_diff']:.3g}")
    print(f"equivalent: {build.trtexec}")
    return 0


def _report_targets(onnx_path: Path) -> set[str] | None:
    """The layers the run that wrote this ONNX targeted, from the report.json beside it (None if there is none)."""
    report = onnx_path.parent / "report.json"
    if not report.is_file():
        return None
    try:
        return set(json.loads(report.read_text())["sparsity"]["per_layer"])
    except (ValueError, KeyError):
        return None


if __name__ == "__main__":
    sys.exit(main())
