"""TensorRT runtime: build an engine from the lowered ONNX with FP16 (optionally INT8) and 2:4 sparse weights.

What a build records: the builder's own lines that list the layers eligible for sparse math and the layers where a
sparse tactic was picked, the per-layer engine information (tactics) from the engine inspector, the build time, and the
equivalent ``trtexec`` command line. ``compare_with_onnxruntime`` runs the engine and onnxruntime on the same tokens.

Needs the ``tensorrt`` Python package and an NVIDIA GPU (with a CUDA build of torch for device buffers); ``available()``
says which is missing. Nothing here is imported at module load, so the module is safe everywhere.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nexus_export.errors import UserError

from .tensorrt_check import check_tensorrt, rows_as_dicts, summarize_tensorrt

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask")
ELIGIBLE_RE = re.compile(r"Layers eligible for sparse math:\s*(.*)$")
PICKED_RE = re.compile(r"picked sparse implementation for layers:\s*(.*)$")


@dataclass(frozen=True)
class Profile:
    """Optimization profile for the dynamic [batch, sequence] inputs: min, opt and max of each."""

    batch: tuple[int, int, int] = (1, 4, 8)
    sequence: tuple[int, int, int] = (2, 128, 512)

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        return tuple((b, s) for b, s in zip(self.batch, self.sequence))  # type: ignore[return-value]


@dataclass
class EngineBuild:
    engine: str
    build_s: float
    fp16: bool
    int8: bool
    sparse: bool
    eligible_layers: list[str] = field(default_factory=list)
    sparse_layers: list[str] = field(default_factory=list)
    layer_tactics: list[dict] = field(default_factory=list)
    trtexec: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def available() -> tuple[bool, str]:
    """Whether engines can be built here, and if not, what to install or where to run."""
    try:
        import tensorrt
    except ImportError:
        return False, ("TensorRT is not installed: on a host with an NVIDIA GPU, pip install tensorrt "
                       "(it is not available for this CPU-only machine)")
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False, "torch is missing"
    if not torch.cuda.is_available():
        return False, f"TensorRT {tensorrt.__version__} is installed but no CUDA GPU is visible to torch"
    return True, f"TensorRT {tensorrt.__version__} on {torch.cuda.get_device_name(0)}"


def trtexec_command(onnx_path: Path, engine_path: Path, profile: Profile, fp16: bool = True, int8: bool = False,
                    sparse: bool = True, timing_cache: Path | None = None) -> str:
    """The trtexec line that builds the same engine, for users who build with it."""
    (bmin, smin), (bopt, sopt), (bmax, smax) = profile.shapes()

    def shape(b: int, s: int) -> str:
        return ",".join(f"{name}:{b}x{s}" for name in INPUTS)

    parts = [f"trtexec --onnx={onnx_path}", f"--saveEngine={engine_path}",
             f"--minShapes={shape(bmin, smin)}", f"--optShapes={shape(bopt, sopt)}", f"--maxShapes={shape(bmax, smax)}"]
    if fp16:
        parts.append("--fp16")
    if int8:
        parts.append("--int8")
    if sparse:
        parts.append("--sparsity=enable")
    if timing_cache:
        parts.append(f"--timingCacheFile={timing_cache}")
    parts += ["--profilingVerbosity=detailed", "--dumpLayerInfo"]
    return " ".join(parts)


def parse_sparsity_lines(lines: list[str]) -> tuple[list[str], list[str]]:
    """(layers eligible for sparse math, layers where a sparse tactic was picked) from TensorRT builder log lines."""
    eligible, picked = [], []
    for line in lines:
        for regex, bucket in ((ELIGIBLE_RE, eligible), (PICKED_RE, picked)):
            m = regex.search(line)
            if m:
                bucket.extend(x.strip() for x in m.group(1).split(",") if x.strip())
    return eligible, picked


def build_engine(onnx_path: str | Path, out_dir: str | Path, profile: Profile = Profile(), fp16: bool = True,
                 int8: bool = False, sparse: bool = True, workspace_gib: float = 4.0,
                 timing_cache: str | Path | None = None) -> EngineBuild:
    """Build ``out_dir/model.engine`` from an ONNX file; also writes ``build.log`` and ``layers.json``."""
    ok, why = available()
    if not ok:
        raise UserError(why)
    import tensorrt as trt

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    if not onnx_path.is_file():
        raise UserError(f"no ONNX file at {onnx_path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = _capturing_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    opt_profile = builder.create_optimization_profile()
    low, opt, high = profile.shapes()
    for name in INPUTS:
        opt_profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - start
    (out_dir / "build.log").write_text("\n".join(logger.lines) + "\n")
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path}; see {out_dir / 'build.log'}")
    engine_path = out_dir / "model.engine"
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))

    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers = info.get("Layers", [])
    (out_dir / "layers.json").write_text(json.dumps(info, indent=1))
    tactics = [{"name": l.get("Name", ""), "tactic": l.get("TacticName", l.get("TacticValue", "")),
                "type": l.get("LayerType", "")} for l in layers if isinstance(l, dict)]
    eligible, picked = parse_sparsity_lines(logger.lines)
    log.info("TensorRT engine %s built in %.0f s: %d layers eligible for sparse math, sparse tactics picked for %d",
             engine_path, build_s, len(eligible), len(picked))
    return EngineBuild(engine=str(engine_path), build_s=round(build_s, 1), fp16=fp16, int8=int8, sparse=sparse,
                       eligible_layers=eligible, sparse_layers=picked, layer_tactics=tactics,
                       trtexec=trtexec_command(onnx_path, engine_path, profile, fp16, int8, sparse, cache_path))


def _capturing_logger(trt):
    """A TensorRT logger that keeps every line (the sparsity report is only in the log) and forwards warnings."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.lines: list[str] = []

        def log(self, severity, msg):
            self.lines.append(f"[{getattr(severity, 'name', severity)}] {msg}")
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                log.warning("TensorRT: %s", msg)

    return Logger()


def run_engine(engine_path: str | Path, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """Logits from a built engine (device buffers are torch CUDA tensors)."""
    ok, why = available()
    if not ok:
        raise UserError(why)
    import tensorrt as trt
    import torch

    logger = _capturing_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64)).cuda()
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(np.asarray(attention_mask)).cuda()
    feeds = {"input_ids": ids, "attention_mask": mask}
    for name, tensor in feeds.items():
        wanted = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
        feeds[name] = tensor.to(wanted).contiguous()
        context.set_input_shape(name, tuple(feeds[name].shape))
        context.set_tensor_address(name, feeds[name].data_ptr())
    out_dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype("logits")))).dtype
    logits = torch.empty(tuple(context.get_tensor_shape("logits")), dtype=out_dtype, device="cuda")
    context.set_tensor_address("logits", logits.data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return logits.float().cpu().numpy()


def compare_with_onnxruntime(engine_path: str | Path, onnx_path: str | Path, batch: int = 2, seq: int = 64,
                             seed: int = 0) -> dict:
    """Max |logits difference| between the engine and onnxruntime (CPU) on the same random tokens."""
    from . import ort

    sess = ort.session(onnx_path)
    vocab = int(sess.get_outputs()[0].shape[-1])
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq), dtype=np.int64)
    reference = ort.logits(sess, ids)
    engine = run_engine(engine_path, ids)
    return {"max_abs_diff": float(np.abs(engine - reference).max()),
            "mean_abs_diff": float(np.abs(engine - reference).mean()), "batch": batch, "seq": seq}


class TensorRT:
    """TensorRT as the command line reaches it (registered as the ``tensorrt`` runtime): the 2:4 eligibility of an
    ONNX file (no TensorRT needed) and engine builds (TensorRT and a GPU needed)."""

    name = "tensorrt"

    @staticmethod
    def available() -> tuple[bool, str]:
        return available()

    @staticmethod
    def check_file(path: Path, targets: set[str] | None = None) -> tuple[dict, list]:
        """The summary and per-layer rows of TensorRT's 2:4 rules applied to ``path`` (see tensorrt_check)."""
        rows = check_tensorrt(path)
        return summarize_tensorrt(rows, targets), rows

    @staticmethod
    def rows_as_dicts(rows: list) -> list[dict]:
        return rows_as_dicts(rows)

    @staticmethod
    def build(onnx_path: Path, out_dir: Path, max_batch: int = 8, max_seq: int = 512, fp16: bool = True,
              int8: bool = False, sparse: bool = True, timing_cache: str | None = None) -> tuple[EngineBuild, dict]:
        """``out_dir/model.engine`` from ``onnx_path`` (a profile up to ``max_batch`` x ``max_seq``) and its parity
        against onnxruntime."""
        profile = Profile(batch=(1, max(1, max_batch // 2), max_batch), sequence=(2, min(128, max_seq), max_seq))
        build = build_engine(onnx_path, out_dir, profile, fp16=fp16, int8=int8, sparse=sparse,
                             timing_cache=timing_cache)
        build.engine = "model.engine"
        return build, compare_with_onnxruntime(Path(out_dir) / "model.engine", onnx_path)
