"""Recipes: the model, an ordered list of passes with options, and calibration, evaluation and lowering settings.

YAML form::

    model: smollm2-135m
    passes:
      - magnitude: {sparsity: 0.5, pattern: "2:4"}
    calibration: {source: austen, samples: 64, seq_len: 512, seed: 0}   # or source: "austen:0.5,notes.txt:0.5"
    evaluation: {source: austen, windows: 64, seq_len: 512, onnx: auto, runtime: pytorch}
    # evaluation may add lm-eval zero-shot tasks: tasks: [hellaswag, arc_easy], task_limit: 200
    lowering: {opset: 18, external_data: true, lower: both}   # lower: both, logits or generate
    bos: auto                     # a BOS token at the start of every window: auto, always, never
    quantize: {bits: 4, group_size: 32, method: gptq}     # optional: also write model.q4.onnx (MatMulNBits)
    execution: {device: auto, dtype: auto, memory_budget: auto}

Everything is validated (pass names, pass options, settings) before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from nexus_export.data.bos import check_mode
from nexus_export.data.sources import is_mix, parse_mix
from nexus_export.engine.pass_base import PassConfig, check_type
from nexus_export.errors import UserError
from nexus_export.graph.runner import parse_device
from nexus_export.registry import get_pass
from nexus_export.weights.store import parse_bytes


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = "austen"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0


@dataclass(frozen=True)
class EvaluationSettings:
    source: str = "austen"
    windows: int = 64
    seq_len: int = 512
    batch_size: int = 2  # windows per forward pass (memory grows with it; speed hardly does)
    latency: bool = True  # measure onnxruntime latency (median of repeated runs)
    decode_speed: bool = True  # prefill/decode tokens per second of the pruned and dense cache models, and a sample
    onnx: str = "auto"  # evaluate the ONNX model in onnxruntime: on, off, auto (off when it would not fit the budget)
    runtime: str = "pytorch"  # which runtime scores the pruned model on every window: pytorch, onnxruntime or both
    cache: bool = True  # reuse the dense perplexity of an earlier run on the same weights and windows
    tasks: list | None = None  # lm-eval tasks for zero-shot accuracy, e.g. [hellaswag, arc_easy] (the eval extra)
    task_limit: int | None = None  # examples per lm-eval task (None: every one)
    task_paths: list | None = None  # folders of local lm-eval task YAML files to add to lm-eval's own


@dataclass(frozen=True)
class LoweringSettings:
    opset: int = 18
    external_data: bool = True
    runtime: str = "onnxruntime"
    save_hf: bool = False  # also write DIR/hf, a Hugging Face folder (passes that keep the architecture)
    precision: str = "fp32"  # fp16: also write model.fp16.onnx with float16 weights (half the size)
    lower: str = "both"  # both: model.onnx (full sequence, scoring) and model.kv.onnx (key/value cache, generation);
    # logits or generate: only one of them


@dataclass(frozen=True)
class ExecutionSettings:
    device: str = "auto"  # where blocks run: auto (CUDA when present), cpu, cuda, cuda:N
    dtype: str = "auto"  # the weights' dtype in every output: auto (the checkpoint's), fp32, fp16, bf16
    memory_budget: str | int = "auto"  # what the weight store keeps resident (and what onnxruntime evaluation may
    # hold); auto: 2 GiB, or one decoder block where a block needs more, within the memory the machine has free


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a dtype as the recipe and report write it (fp32, fp16, bf16)."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def output_dtype(name: str) -> torch.dtype | None:
    """``fp32``/``fp16``/``bf16`` -> the torch dtype; ``auto`` -> None (the checkpoint's own)."""
    if name == "auto":
        return None
    if name not in DTYPES:
        raise UserError(f"dtype {name!r} is not one of auto, fp32, fp16, bf16")
    return DTYPES[name]


@dataclass(frozen=True)
class QuantizeSettings:
    """Weight-only quantization to MatMulNBits, written beside the float model: GPTQ on the decoder linears, or round
    to nearest on every MatMul weight."""

    bits: int = 4  # 4 or 8
    group_size: int = 32  # inputs per scale (MatMulNBits block size)
    method: str = "auto"  # gptq (error-compensated, calibrated) or rtn (round to nearest); auto: gptq when the run
    # calibrates anyway, else rtn
    sym: bool = True  # symmetric grid; False: a zero point per group (0 is still exact)
    act_order: bool | None = None  # gptq: columns in decreasing Hessian diagonal order; default on (off for rtn and
    # for the joint sparsegpt sweep, which chooses N:M groups in stored order)
    clip_search: bool | None = None  # gptq: each group's range shrunk where that rounds closer; default on (off for
    # rtn, onnxruntime's quantizer, and for the joint sparsegpt sweep, which fits a group's range before its mask)
    joint: bool = False  # gptq: prune (the last sparsegpt or wanda pass) and quantize in one sweep per layer
    percdamp: float = 0.01  # gptq: damping, as a fraction of the mean Hessian diagonal
    head: bool = True  # the token embedding and lm_head too, round to nearest (a tied pair stays one tensor)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (onnxruntime's fastest on CPUs), 0 = float32


def _shown(keys: set) -> list[str]:
    """Keys as an error message shows them, sorted: quoted when they hold a newline or another unprintable character
    (the message stays one line)."""
    return sorted(str(k) if str(k).isprintable() else repr(k) for k in keys)


def _settings(cls, data: Any, section: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise UserError(f"recipe section {section!r} must be a mapping of settings")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = _shown(set(data) - names)
    if unknown:
        raise UserError(f"unknown key(s) {', '.join(unknown)} in recipe section {section!r}; valid: {', '.join(sorted(names))}")
    import typing
    hints = typing.get_type_hints(cls)
    for k, v in data.items():
        if v is None and type(None) not in typing.get_args(hints[k]):
            raise UserError(f"{k} of recipe section {section!r} has no value (null); give one, or leave the key out "
                            "for the default")
    values = {k: check_type(v, hints[k], k, f"recipe section {section!r}") for k, v in data.items()}
    settings = cls(**values)
    for f in dataclasses.fields(cls):
        v = getattr(settings, f.name)
        if isinstance(v, int) and not isinstance(v, bool) and f.name not in ("seed", "accuracy_level") and v <= 0:
            raise UserError(f"{section}.{f.name} must be positive, got {v}")
    return settings


@dataclass(frozen=True)
class PassStep:
    name: str
    config: PassConfig


@dataclass(frozen=True)
class Recipe:
    model: str
    passes: tuple[PassStep, ...] = ()
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    lowering: LoweringSettings = field(default_factory=LoweringSettings)
    quantize: QuantizeSettings | None = None
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    bos: str = "auto"  # start every calibration and evaluation window with the BOS token: auto, always, never
    convert_pickled: bool = False  # a folder with only pytorch_model*.bin: convert it once to safetensors (no code runs)

    @classmethod
    def from_dict(cls, data: Any) -> "Recipe":
        if not isinstance(data, dict):
            raise UserError("a recipe must be a mapping with at least 'model' and 'passes'")
        valid = {"model", "passes", "calibration", "evaluation", "lowering", "quantize", "execution", "bos",
                 "convert_pickled"}
        unknown = _shown(set(data) - valid)
        if unknown:
            raise UserError(f"unknown recipe key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
        if not data.get("model") or not isinstance(data["model"], (str, Path)):
            raise UserError("the recipe names no model; add e.g. 'model: tiny-llama' (a zoo name or a folder)")
        passes = data.get("passes") or []
        if not isinstance(passes, list):
            raise UserError(f"passes must be a list like '- magnitude: {{sparsity: 0.5}}', got "
                            f"{type(passes).__name__} {passes!r}")
        steps = []
        for i, entry in enumerate(passes):
            if isinstance(entry, str):
                entry = {entry: {}}
            if not isinstance(entry, dict) or len(entry) != 1:
                raise UserError(f"passes[{i}] must be a single-key mapping like '- magnitude: {{sparsity: 0.5}}'")
            (name, options), = entry.items()
            if not isinstance(name, str):
                raise UserError(f"passes[{i}] names pass {name!r}; pass names are words like magnitude or sparsegpt")
            pass_cls = get_pass(name)
            for earlier in steps:
                if earlier.name in pass_cls.not_after:
                    raise UserError(f"{name} cannot run after {earlier.name} (passes[{i}]); "
                                    f"{pass_cls.not_after[earlier.name]}")
            steps.append(PassStep(name=name, config=pass_cls.config_class.from_options(options, name)))
        if any(step.name == "gptq" for step in steps):
            raise UserError("gptq is not a pass of the passes list: ask for it in the quantize section "
                            "(quantize: {bits: 4, method: gptq}) or with --quantize-bits 4 --quantize-method gptq")
        recipe = cls(
            model=str(data["model"]),
            passes=tuple(steps),
            calibration=_calibration(data.get("calibration")),
            evaluation=_evaluation(data.get("evaluation")),
            lowering=_lowering(data.get("lowering")),
            quantize=_quantize(data.get("quantize"), tuple(steps)),
            execution=_execution(data.get("execution")),
            bos=check_mode(data.get("bos", "auto")),
            convert_pickled=check_type(data.get("convert_pickled", False), bool, "convert_pickled", "the recipe"),
        )
        run_steps(recipe)  # the joint pass's options are checked now, not after the work
        return recipe

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        if path.is_dir():
            raise UserError(f"{path} is a folder; give the recipe's YAML file (a run folder keeps its recipe in "
                            f"{path / 'recipe.yaml'})")
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"recipe {path} is not UTF-8 text; save it as UTF-8 YAML") from None
        except OSError as exc:
            raise UserError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "passes": [{s.name: _clean(s.config.to_dict())} for s in self.passes],
            "calibration": dataclasses.asdict(self.calibration),
            "evaluation": dataclasses.asdict(self.evaluation),
            "lowering": dataclasses.asdict(self.lowering),
            **({"quantize": dataclasses.asdict(self.quantize)} if self.quantize else {}),
            "execution": dataclasses.asdict(self.execution),
            "bos": self.bos,
            **({"convert_pickled": True} if self.convert_pickled else {}),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


EVAL_RUNTIMES = ("pytorch", "onnxruntime", "both")


def _calibration(data: Any) -> CalibrationSettings:
    settings = _settings(CalibrationSettings, data, "calibration")
    parse_mix(settings.source)  # a mix's form and shares are checked now, its files when they are read
    return settings


def _evaluation(data: Any) -> EvaluationSettings:
    settings = _settings(EvaluationSettings, data, "evaluation")
    if settings.onnx not in ("auto", "on", "off"):
        raise UserError(f"evaluation.onnx (--onnx-eval) must be auto, on or off, got {settings.onnx!r}")
    if is_mix(settings.source):
        raise UserError(f"evaluation.source (--eval-source) {settings.source!r} is a mix; mixes are for calibration, "
                        "evaluate on one source at a time")
    if settings.runtime not in EVAL_RUNTIMES:
        raise UserError(f"evaluation.runtime (--eval-runtime) must be one of {', '.join(EVAL_RUNTIMES)}, got "
                        f"{settings.runtime!r}")
    for key in ("tasks", "task_paths"):
        values = getattr(settings, key)
        if values is not None and (not values or not all(isinstance(v, str) and v.strip() for v in values)):
            raise UserError(f"evaluation.{key} must be a non-empty list of names, got {values!r}")
    if settings.runtime != "pytorch" and settings.onnx == "off":
        raise UserError(f"--eval-runtime {settings.runtime} scores the model in onnxruntime, and --onnx-eval off "
                        "turns onnxruntime off; drop one of them")
    return settings


def _execution(data: Any) -> ExecutionSettings:
    settings = _settings(ExecutionSettings, data, "execution")
    output_dtype(settings.dtype)
    if settings.memory_budget != "auto":
        parse_bytes(settings.memory_budget)
    parse_device(settings.device)
    return settings


MIN_OPSET = 18  # the lowest opset torch's ONNX exporter (torchlib) implements
LOWER = ("both", "logits", "generate")  # the models lowering writes: both, the full-sequence one, the cache one


def _lowering(data: Any) -> LoweringSettings:
    settings = _settings(LoweringSettings, data, "lowering")
    if settings.opset < MIN_OPSET:
        raise UserError(f"lowering.opset {settings.opset} is not supported: torch's ONNX exporter needs opset >= "
                        f"{MIN_OPSET}")
    if settings.precision not in ("fp32", "fp16"):
        raise UserError(f"lowering.precision must be fp32 or fp16, got {settings.precision!r}")
    if settings.lower not in LOWER:
        raise UserError(f"lowering.lower (--lower) must be one of {', '.join(LOWER)}, got {settings.lower!r}")
    return settings


def _quantize(data: Any, passes: tuple[PassStep, ...]) -> QuantizeSettings | None:
    if data is None or data is False:
        return None
    data = {} if data is True else data
    if isinstance(data, dict) and "block_size" in data:  # the earlier name of group_size
        if "group_size" in data:
            raise UserError("quantize has both block_size and group_size; keep group_size")
        data = {("group_size" if k == "block_size" else k): v for k, v in data.items()}
    settings = _settings(QuantizeSettings, data, "quantize")
    if settings.bits not in (4, 8):
        raise UserError(f"quantize.bits (--quantize-bits) must be 4 or 8, got {settings.bits}")
    if settings.group_size < 16 or settings.group_size & (settings.group_size - 1):
        raise UserError(f"quantize.group_size (--group-size) must be a power of two >= 16 (e.g. 32, 64, 128), got "
                        f"{settings.group_size}")
    if settings.accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"quantize.accuracy_level (--accuracy-level) must be 0 (float32 compute) to 4 (int8), got "
                        f"{settings.accuracy_level}")
    if settings.method not in ("auto", "gptq", "rtn"):
        raise UserError(f"quantize.method (--quantize-method) must be gptq or rtn, got {settings.method!r}")
    if settings.method == "auto":
        calibrates = any(get_pass(step.name)(step.config).needs_calibration for step in passes)
        settings = dataclasses.replace(settings, method="gptq" if calibrates else "rtn")
    if settings.method == "rtn":
        for flag, on in (("act_order (--act-order)", settings.act_order), ("joint (--joint)", settings.joint),
                         ("clip_search (--clip-search)", settings.clip_search)):
            if on:
                raise UserError(f"quantize.{flag} needs the gptq method (--quantize-method gptq); round to nearest "
                                "has no column order, sweep or range search")
    joinable = get_pass("gptq").joint_methods
    if settings.joint and not any(step.name in joinable for step in passes):
        raise UserError(f"quantize.joint (--joint) prunes and quantizes in one sweep and needs a "
                        f"{' or '.join(joinable)} pass to join; the recipe has "
                        f"{', '.join(step.name for step in passes) or 'no passes'}")
    # the joint SparseGPT sweep chooses N:M groups in stored order as it goes: no act-order, and no range search (a
    # group's range is fitted before its mask is final; measured on SmolLM2-135M 2:4: 73.08 whole, 74.74 searched)
    joined = [step.name for step in passes if step.name in joinable][-1:] if settings.joint else []
    in_sweep = settings.method == "gptq" and joined != ["sparsegpt"]
    if settings.clip_search is None:
        settings = dataclasses.replace(settings, clip_search=in_sweep)
    if settings.act_order is None:
        settings = dataclasses.replace(settings, act_order=in_sweep)
    return settings


def run_steps(recipe: Recipe) -> tuple[PassStep, ...]:
    """The passes a run executes: the recipe's, and GPTQ at the end (or, joint, in place of the last sparsegpt or
    wanda pass, which it then runs inside its sweep)."""
    q = recipe.quantize
    if q is None or q.method != "gptq":
        return recipe.passes
    options = {"bits": q.bits, "group_size": q.group_size, "sym": q.sym, "act_order": q.act_order,
               "clip_search": q.clip_search, "percdamp": q.percdamp}
    steps = list(recipe.passes)
    if not q.joint:
        return (*steps, PassStep("gptq", get_pass("gptq").config_class.from_options(options, "gptq")))
    i = max(i for i, step in enumerate(steps) if step.name in get_pass("gptq").joint_methods)
    mask = steps[i].config.to_dict()
    calibration = {k: mask.pop(k) for k in ("batch_size", "true_sequential", "blocksize", "percdamp") if k in mask}
    options.update(calibration, prune={"method": steps[i].name, **_clean(mask)})
    steps[i] = PassStep("gptq", get_pass("gptq").config_class.from_options(options, "gptq"))
    return tuple(steps)


def _clean(options: dict) -> dict:
    return {k: v for k, v in options.items() if v is not None}
