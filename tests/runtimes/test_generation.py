"""The key/value-cache model: every step equals the full-sequence model, and greedy generation equals transformers'
own (dense, masked, fewer blocks) or the program's (sliced, activation thresholds), on every family; the variants;
onnxruntime-genai loading the same folder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers
from conftest import ARCHS, BLOCK_FORMS, archs, make_tiny, tiny_program

from nexus_export.generate.loop import HFDecoder, ProgramDecoder, Sampling, generate
from nexus_export.graph.hf_export import save_hf
from nexus_export.graph.program import Program
from passes.activation import ActivationPass
from passes.magnitude import MagnitudePass
from passes.shortgpt import ShortGPTPass
from passes.slicegpt import SliceGPTPass
from runtimes import genai, ort
from runtimes.decode import CacheDecoder, decode_speed, kv_bytes_per_token
from runtimes.onnx_export import cache_path, lower_to_onnx
from runtimes.precision import to_fp16_weights
from runtimes.quantize import quantize_onnx

NEW_TOKENS = 64
PROMPT = [5, 17, 42, 99, 3, 250, 7, 61]  # 8 tokens; with 64 new ones longer than Gemma 2/3's window of 32


def ids_of(seed: int, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def stepwise(sess, ids: torch.Tensor, prompt: int = 5) -> np.ndarray:
    """Logits of every position from the prompt's last on: the prompt in one call, then one token per call."""
    decoder = CacheDecoder(sess)
    rows = [decoder.prefill(ids[0, :prompt].tolist())]
    rows += [decoder.step(int(t)) for t in ids[0, prompt:]]
    return np.stack(rows)


def hf_greedy(model, prompt: list[int], new: int = NEW_TOKENS) -> list[int]:
    """transformers' own greedy generation of exactly ``new`` tokens (no end-of-sequence stop)."""
    config = transformers.GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=config)
    return out[0, len(prompt):].tolist()


def lowered(program, tmp_path, name="model"):
    full = lower_to_onnx(program, tmp_path / name / "model.onnx")
    return ort.session(full, threads=1), ort.session(cache_path(full), threads=1)


def test_lowering_writes_a_cache_model_beside_the_full_one(tmp_path):
    full, kv = lowered(tiny_program("llama"), tmp_path)
    assert [v.name for v in full.get_inputs()] == ["input_ids", "attention_mask"]
    assert [v.name for v in full.get_outputs()] == ["logits"]
    names = [v.name for v in kv.get_inputs()]
    assert names == ["input_ids", "attention_mask", "position_ids",
                     *[f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]]
    assert [v.name for v in kv.get_outputs()] == ["logits", *[f"present.{i}.{k}" for i in range(2)
                                                              for k in ("key", "value")]]
    past = kv.get_inputs()[3]
    assert past.shape == ["batch", 2, "past_sequence", 16] and kv.get_inputs()[1].shape == ["batch", "total_sequence"]
    assert kv_bytes_per_token(kv) == 2 * 2 * (2 * 16 * 4)  # 2 layers x keys and values x 2 heads x 16 x float32
    # both files read the one data file: no tensor is stored twice
    graph = onnx.load(str(tmp_path / "model" / "model.kv.onnx"), load_external_data=False).graph
    # opset 23: each attention is one Attention node reading the cache's 2 key/value heads for its 4 query heads
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert len(attention) == 2 and [n.input[1] for n in attention] == ["present.0.key", "present.1.key"]
    assert {e.domain: e.version for e in onnx.load(str(tmp_path / "model" / "model.onnx"),
                                                    load_external_data=False).opset_import}[""] == 18
    locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"} and sorted(p.name for p in (tmp_path / "model").iterdir()) == [
        "model.kv.onnx", "model.onnx", "model.onnx.data"]


@pytest.mark.parametrize("arch", archs(*ARCHS, *BLOCK_FORMS))
def test_every_step_equals_the_full_sequence_and_greedy_equals_transformers(arch, tmp_path):
    model = make_tiny(arch)
    program = Program.from_model(model)
    full, kv = lowered(program, tmp_path)
    ids = ids_of(1)
    expected = ort.logits(full, ids)[0, 4:]
    assert np.abs(stepwise(kv, ids) - expected).max() <= 1e-4
    assert np.abs(expected - model(ids).logits[0, 4:].detach().numpy()).max() <= 1e-4
    ours = generate(CacheDecoder(kv), PROMPT, NEW_TOKENS).tokens
    assert ours == hf_greedy(model, PROMPT)


def test_a_batch_with_left_padding_matches_each_row_alone(tmp_path):
    """The cache model takes its positions and mask from the caller: a left-padded row decodes as it would alone."""
    _, kv = lowered(tiny_program("llama"), tmp_path)
    alone = CacheDecoder(kv)
    expected = [alone.prefill(PROMPT[2:])]
    expected.append(alone.step(11))
    heads, dim = kv.get_inputs()[3].shape[1], kv.get_inputs()[3].shape[3]
    past = {v.name: np.zeros((2, heads, 0, dim), np.float32) for v in ort.cache_inputs(kv)}
    ids = np.array([PROMPT, [0, 0] + PROMPT[2:]], dtype=np.int64)
    mask = np.array([[1] * 8, [0, 0] + [1] * 6], dtype=np.int64)
    positions = np.array([list(range(8)), [0, 0] + list(range(6))], dtype=np.int64)
    names = [v.name for v in kv.get_outputs()]
    out = dict(zip(names, kv.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                        **past})))
    past = {n.replace("present.", "past_key_values."): v for n, v in out.items() if n.startswith("present.")}
    step = dict(zip(names, kv.run(None, {"input_ids": np.array([[11], [11]]), "attention_mask":
                                         np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
                                         "position_ids": np.array([[8], [6]]), **past})))
    assert np.abs(out["logits"][1, -1] - expected[0]).max() <= 1e-4
    assert np.abs(step["logits"][1, -1] - expected[1]).max() <= 1e-4


def test_masked_model_generates_as_transformers_does_with_the_same_weights(tmp_path):
    model = make_tiny("llama")
    program = Program.from_model(model, write_through=True)  # the masks land in the transformers model too
    pruned = MagnitudePass({"pattern": "2:4", "permute": True}).run(program).program
    _, kv = lowered(pruned, tmp_path)
    assert float((model.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    assert generate(CacheDecoder(kv), PROMPT, NEW_TOKENS).tokens == hf_greedy(model, PROMPT)


@pytest.mark.slow
@pytest.mark.parametrize("arch", archs("llama", "gpt2", "opt"))
def test_fewer_blocks_fewer_cache_pairs_and_the_saved_folder_generates_the_same(arch, tmp_path):
    program = tiny_program(arch, layers=3)
    short = ShortGPTPass({"layers": "1"}).run(program).program
    full, kv = lowered(short, tmp_path)
    assert len(ort.cache_inputs(kv)) == 4  # 2 remaining blocks x keys and values
    assert np.abs(stepwise(kv, ids_of(2)) - ort.logits(full, ids_of(2))[0, 4:]).max() <= 1e-4
    save_hf(short, tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert generate(CacheDecoder(kv), PROMPT, NEW_TOKENS).tokens == hf_greedy(reloaded, PROMPT)


@pytest.mark.slow
@pytest.mark.parametrize("arch", archs("llama", "opt"))
def test_sliced_model_generates_as_its_program(arch, tmp_path):
    """SliceGPT rotates and slices the stream; the heads keep their sizes, and the cache model follows the program."""
    program = tiny_program(arch, random_norms=True)
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    from nexus_export.engine.pass_base import PassContext

    sliced = SliceGPTPass({"slicing": 0.25}).run(program, PassContext(calibration_windows=calibration)).program
    full, kv = lowered(sliced, tmp_path)
    heads = kv.get_inputs()[3].shape[1]
    assert heads == program.config.num_key_value_heads if arch == "llama" else heads == 4
    assert np.abs(stepwise(kv, ids_of(3)) - ort.logits(full, ids_of(3))[0, 4:]).max() <= 1e-4
    assert generate(CacheDecoder(kv), PROMPT, 24).tokens == generate(ProgramDecoder(sliced), PROMPT, 24).tokens


@pytest.mark.slow
def test_activation_thresholds_generate_as_the_program(tmp_path):
    program = tiny_program("llama")
    calibration = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    from nexus_export.engine.pass_base import PassContext

    gated = ActivationPass({"sparsity": 0.4}).run(program, PassContext(calibration_windows=calibration)).program
    full, kv = lowered(gated, tmp_path)
    assert np.abs(stepwise(kv, ids_of(4)) - ort.logits(full, ids_of(4))[0, 4:]).max() <= 1e-4
    assert generate(CacheDecoder(kv), PROMPT, 24).tokens == generate(ProgramDecoder(gated), PROMPT, 24).tokens


@pytest.mark.slow
def test_fp16_and_int4_variants_have_cache_twins_that_step_like_their_full_models(tmp_path):
    full = lower_to_onnx(tiny_program("llama"), tmp_path / "model.onnx")
    for dst in (to_fp16_weights(cache_path(full), tmp_path / "model.fp16.onnx"),
                quantize_onnx(cache_path(full), tmp_path / "model.q4.onnx", 4, 32)):
        kv = ort.session(cache_path(dst), threads=1)
        assert np.abs(stepwise(kv, ids_of(5)) - ort.logits(ort.session(dst), ids_of(5))[0, 4:]).max() <= 1e-4
    nbits = [n.op_type for n in onnx.load(str(tmp_path / "model.q4.kv.onnx"), load_external_data=False).graph.node]
    assert "MatMulNBits" in nbits


def test_sampling_is_seeded_and_greedy_is_the_default(tmp_path):
    _, kv = lowered(tiny_program("llama"), tmp_path)
    greedy = generate(CacheDecoder(kv), PROMPT, 16)
    assert greedy.tokens == generate(CacheDecoder(kv), PROMPT, 16, Sampling()).tokens
    hot = Sampling(temperature=5.0, top_p=0.95, seed=3)
    first = generate(CacheDecoder(kv), PROMPT, 16, hot).tokens
    assert first == generate(CacheDecoder(kv), PROMPT, 16, hot).tokens and first != greedy.tokens
    assert generate(CacheDecoder(kv), PROMPT, 16, stop_ids=[greedy.tokens[3]]).tokens == greedy.tokens[:4]


def test_decode_speed_reports_medians_and_the_cache_size(tmp_path):
    _, kv = lowered(tiny_program("llama"), tmp_path)
    speed = decode_speed(kv, prompt_tokens=16, new_tokens=8, runs=2)
    assert speed["prefill_tokens_per_s"] > 0 and speed["decode_tokens_per_s"] > 0
    assert speed["kv_bytes_per_token"] == kv_bytes_per_token(kv) and speed["runs"] == 2


def test_a_program_and_transformers_decode_alike():
    model = make_tiny("llama")
    assert generate(ProgramDecoder(Program.from_model(model)), PROMPT, 16).tokens == \
        generate(HFDecoder(model), PROMPT, 16).tokens == hf_greedy(model, PROMPT, 16)


@pytest.mark.skipif(not genai.available()[0], reason=genai.available()[1])
def test_onnxruntime_genai_loads_the_folder_and_generates_the_same(tmp_path):
    model = make_tiny("llama")
    program = Program.from_model(model)
    full = lower_to_onnx(program, tmp_path / "model.onnx")
    from nexus_export.models.zoo import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    genai.write_config(tmp_path, "model.kv.onnx", model.config, tokenizer)
    ours = generate(CacheDecoder(ort.session(cache_path(full))), PROMPT, NEW_TOKENS).tokens
    assert generate(genai.GenaiDecoder(tmp_path, 512), PROMPT, NEW_TOKENS).tokens == ours == hf_greedy(model, PROMPT)
