"""Text in, text out: generation from a run folder, a bundle, a program or a model, for ``nexus-export generate`` and
the Python API (``generate_text``).

A source becomes a *decoder* (see generation.py) and a tokenizer:
- a run folder or bundle: its deployable model's key/value-cache twin in onnxruntime (``onnxruntime``), the folder
  as onnxruntime-genai loads it (``genai``), or its Hugging Face folder ``hf/`` in PyTorch (``pytorch``, runs made
  with --save-hf);
- a model (zoo name or Hugging Face folder, the dense model): in PyTorch with transformers' own cache, or lowered
  once into a temporary folder for onnxruntime and onnxruntime-genai;
- a ``Program`` (Python only): recomputed in full through its graph at every token (any pass, a sliced model too).
Everything a run can refuse (no cache model, a prompt longer than the context, no token to generate) is refused
before the first token.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nexus_export.errors import UserError
from nexus_export.generate.loop import Generated, HFDecoder, ProgramDecoder, Sampling, generate
from nexus_export.graph.program import Program
from nexus_export.registry import get_runtime

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "genai", "pytorch")


@dataclass
class TextResult:
    """A generation's text (the new part), its tokens and speeds."""

    prompt: str
    text: str
    generated: Generated

    def speed_line(self) -> str:
        g = self.generated
        return (f"prefill {g.prompt_tokens} tokens in {g.prefill_s:.2f} s ({g.prefill_tokens_per_s:.1f} tokens/s); "
                f"decode {len(g.tokens)} tokens in {g.decode_s:.2f} s ({g.decode_tokens_per_s:.1f} tokens/s)"
                + (", stopped at the end-of-sequence token" if g.stopped == "eos" else ""))


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def generate_text(source: Any, prompt: str, max_new_tokens: int = 64, runtime: str = "onnxruntime",
                  sampling: Sampling = Sampling(), on_text: Callable[[str], None] | None = None,
                  tokenizer: Any = None) -> TextResult:
    """Generate up to ``max_new_tokens`` after ``prompt`` from ``source`` (a run folder or bundle path, a zoo name or
    Hugging Face folder, a Program, or a transformers model; see the module docstring). ``on_text`` sees the text
    as it grows, piece by piece."""
    check_runtime(runtime)
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    with ExitStack() as stack:
        make_decoder, tokenizer, context = _open(source, runtime, tokenizer, stack)
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise UserError("the prompt is empty: give at least one token of text")
        if context and len(ids) + max_new_tokens > context:
            raise UserError(f"the prompt has {len(ids)} tokens and --max-new-tokens is {max_new_tokens}: together "
                            f"more than the model's context of {context} tokens; shorten the prompt or ask for fewer "
                            "tokens")
        stream = _TextStream(tokenizer, on_text)
        generated = generate(make_decoder(), ids, max_new_tokens, sampling, stop_ids(tokenizer, source),
                             stream.push)
    return TextResult(prompt=prompt, text=stream.text, generated=generated)


class _TextStream:
    """The generated text as it grows: each token's piece is what decoding all tokens so far adds (so characters
    made of several tokens come out whole)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.text = ""

    def push(self, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a character: wait for the rest
            return
        piece, self.text = text[len(self.text):], text
        if piece and self.on_text is not None:
            self.on_text(piece)


def stop_ids(tokenizer, source: Any) -> list[int]:
    """The end-of-sequence ids: the tokenizer's and, for a folder, its generation config's."""
    ids = {tokenizer.eos_token_id} if getattr(tokenizer, "eos_token_id", None) is not None else set()
    if isinstance(source, (str, Path)) and Path(source, "generation_config.json").is_file():
        try:
            eos = json.loads(Path(source, "generation_config.json").read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return sorted(ids)


def _open(source: Any, runtime: str, tokenizer: Any, stack: ExitStack) -> tuple[Callable[[], Any], Any, int | None]:
    """(a function making the decoder, the tokenizer, the context length or None) for a source (see generate_text):
    the prompt is checked against the context before anything is loaded or lowered."""
    if isinstance(source, Program):
        if runtime != "pytorch":
            raise UserError(f"a Program generates in PyTorch (runtime pytorch), not {runtime}: lower it first "
                            "(export_onnx) and generate from the folder")
        tok = tokenizer or source.tokenizer
        if tok is None:
            raise UserError("the program has no tokenizer: pass tokenizer=")
        return lambda: ProgramDecoder(source), tok, _context(source.config)
    if hasattr(source, "forward") and not isinstance(source, (str, Path)):
        if runtime != "pytorch":
            raise UserError(f"a model object generates in PyTorch (runtime pytorch), not {runtime}")
        if tokenizer is None:
            raise UserError("a model object needs tokenizer=")
        return lambda: HFDecoder(source), tokenizer, _context(getattr(source, "config", None))
    folder = Path(source)
    if folder.is_dir() and ((folder / "report.json").is_file() or (folder / "manifest.json").is_file()):
        return _open_output(folder, runtime, tokenizer)
    return _open_model(str(source), runtime, tokenizer, stack)


def _open_output(folder: Path, runtime: str, tokenizer: Any) -> tuple[Callable[[], Any], Any, int | None]:
    """A run folder or bundle."""
    from transformers import AutoConfig, AutoTokenizer

    tok_dir = folder if (folder / "tokenizer_config.json").is_file() else folder / "tokenizer"
    if tokenizer is None:
        if not (tok_dir / "tokenizer_config.json").is_file():
            raise UserError(f"{folder} holds no tokenizer files; it is not a complete run folder or bundle")
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    if runtime == "pytorch":
        hf = folder / "hf"
        if not (hf / "config.json").is_file():
            raise UserError(f"{folder} has no PyTorch model (hf/, written by runs with --save-hf); generate with "
                            "--runtime onnxruntime, or prune again with --save-hf (not possible after slicegpt)")
        from transformers import AutoModelForCausalLM

        def pytorch():
            return HFDecoder(AutoModelForCausalLM.from_pretrained(hf, local_files_only=True, trust_remote_code=False))

        return pytorch, tokenizer, _context(AutoConfig.from_pretrained(hf, local_files_only=True))
    model_path = _cache_model(folder)
    context = _genai_context(folder)
    if runtime == "genai":
        genai = get_runtime("genai")
        genai.require()
        return lambda: genai().decoder(folder, context), tokenizer, context
    return lambda: get_runtime("onnxruntime")().decoder(model_path), tokenizer, context


def _cache_model(folder: Path) -> Path:
    """The key/value-cache model of a run folder or bundle (the deployable model's twin), or a UserError saying how to
    get one."""
    deploy = None
    for name, key in (("report.json", ("deploy", "model")), ("manifest.json", ("model",))):
        if (folder / name).is_file():
            try:
                data = json.loads((folder / name).read_text())
            except ValueError:
                raise UserError(f"{folder / name} is not valid JSON: the folder is damaged") from None
            for k in key:
                data = data.get(k) if isinstance(data, dict) else None
            deploy = data if isinstance(data, str) else deploy
    candidates = []
    if deploy:
        candidates.append(deploy if deploy.endswith(".kv.onnx") else deploy.replace(".onnx", ".kv.onnx"))
    candidates.append("model.kv.onnx")
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    recipe = folder / "recipe.yaml"
    how = (f"lower it again: nexus-export run {recipe} --out NEW_DIR (the default --lower both writes the cache "
           "model)" if recipe.is_file() else "prune again with this version (the default --lower both writes it)")
    raise UserError(f"{folder} has no key/value-cache model ({candidates[0]}): it was made before generation "
                    f"support or with --lower logits; {how}")


def _genai_context(folder: Path) -> int | None:
    config = folder / "genai_config.json"
    if config.is_file():
        try:
            return int(json.loads(config.read_text())["model"]["context_length"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _context(config: Any) -> int | None:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def _open_model(name: str, runtime: str, tokenizer: Any, stack: ExitStack
                ) -> tuple[Callable[[], Any], Any, int | None]:
    """The dense model: in PyTorch, or lowered once into a temporary folder for onnxruntime and onnxruntime-genai."""
    from nexus_export.models.zoo import load_model, open_model

    loaded = open_model(name)
    if loaded.tokenizer is None and tokenizer is None:
        raise UserError(f"model {name} has no tokenizer")
    tokenizer = tokenizer or loaded.tokenizer
    context = _context(loaded.model.config)
    if runtime == "pytorch":
        return lambda: HFDecoder(load_model(name).model), tokenizer, context
    if runtime == "genai":
        get_runtime("genai").require()

    def lowered():
        onnx = get_runtime("onnxruntime")()
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nexus-export-generate-")))
        log.info("lowering %s to a temporary key/value-cache model (once per command)", name)
        cache_model = onnx.lower(Program.from_loaded(loaded), folder, lower="generate")
        if runtime == "onnxruntime":
            return onnx.decoder(cache_model)
        tokenizer.save_pretrained(folder)
        onnx.write_generation_config(folder, cache_model, loaded.model.config, tokenizer,
                                     getattr(loaded.model, "generation_config", None))
        return get_runtime("genai")().decoder(folder, context)

    return lowered, tokenizer, context
