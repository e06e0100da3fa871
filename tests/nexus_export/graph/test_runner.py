"""The block runner: the cut graph reproduces the model block by block, with one block's weights loaded at a time."""

import pytest
import torch
from conftest import archs, make_tiny, tiny_program

from nexus_export.errors import UserError
from nexus_export.evaluation.evaluate import program_perplexity
from nexus_export.graph.capture import parameters_on_meta
from nexus_export.graph.program import Program
from nexus_export.graph.runner import BlockRunner, resolve_device
from nexus_export.metrics import next_token_nll, perplexity
from nexus_export.weights.shards import checkpoint_files, index_checkpoint


def windows(n=3, seq=12, seed=0):
    return torch.randint(0, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", archs("llama", "opt", "gpt2"))
def test_blocks_reproduce_hidden_states(arch):
    model = make_tiny(arch, layers=3)
    program = Program.from_model(model)
    ids = windows()
    runner = BlockRunner(program, ids, batch_size=2)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    assert torch.allclose(torch.cat(runner.streams()), hidden[0], atol=1e-5)
    for k in range(2):  # the last hidden state is reported after the final norm
        runner.step(k)
        assert torch.allclose(torch.cat(runner.streams()), hidden[k + 1], atol=1e-5)


@pytest.mark.parametrize("arch", archs("llama", "gpt2"))
def test_suffix_completes_the_model(arch):
    model = make_tiny(arch)
    program = Program.from_model(model)
    ids = windows(n=2)
    runner = BlockRunner(program, ids, batch_size=2)
    after_attention = []
    index = runner.graphs.residuals[0]["attention"]
    runner.step(0, lambda h_in, out: after_attention.append(out[index]), [index])
    assert after_attention[0].shape == runner.streams()[0].shape
    runner.step(1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert torch.allclose(runner.logits(0), expected, atol=1e-5)


def test_visits_see_whole_batches_while_forwards_run_in_micro_batches():
    program = tiny_program("llama")
    ids = windows(n=7, seq=12)
    runner = BlockRunner(program, ids, batch_size=4)
    assert runner.micro == 2 and [len(s) for s in runner.streams()] == [2, 2, 2, 1]
    seen = []
    runner.run(0, lambda i, h_in, out: seen.append((i, len(h_in), out[0].shape[0], out[1])), [0])
    assert [(i, n, m, extra) for i, n, m, extra in seen] == [(0, 4, 4, None), (1, 3, 3, None)]
    whole = BlockRunner(program, ids, batch_size=7)
    assert whole.micro == 1
    runner.step(0)
    whole.step(0)
    assert torch.equal(torch.cat(runner.streams()), torch.cat(whole.streams()))


def test_each_step_loads_only_its_block(monkeypatch):
    program = tiny_program("llama", layers=3)
    runner = BlockRunner(program, windows(), batch_size=2)
    asked = []
    real_get = program.store.get
    monkeypatch.setattr(program.store, "get", lambda name, *a, **kw: asked.append(name) or real_get(name, *a, **kw))
    runner.step(1)
    assert asked and all(".layers.1." in name for name in asked)


def test_evaluation_equals_a_plain_forward_pass():
    model = make_tiny("llama")
    ids = windows(n=5, seq=20)
    with torch.no_grad():
        nll, count = next_token_nll(model(input_ids=ids).logits, ids)
    ppl, tokens = program_perplexity(Program.from_model(model), ids, batch_size=2)
    assert tokens == count == 5 * 19
    assert ppl == pytest.approx(perplexity(nll, count), rel=1e-5)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="sees no CUDA GPU"):
            resolve_device("cuda:0")


@pytest.mark.parametrize("arch", archs("llama", "gpt2"))
def test_a_large_vocabulary_is_read_in_rows_with_the_same_result(arch, monkeypatch):
    """Past WHOLE_VOCABULARY_BYTES the token embedding is read as the rows of the tokens at hand (the same streams,
    to the bit) and the head a chunk of rows at a time (the same NLL). GPT-2 also reads positions through an
    embedding, which stays whole, and its suffix reads side values, so its head is read whole."""
    from nexus_export.graph import runner as runner_module

    program = tiny_program(arch)
    ids = windows(n=4, seq=24)
    whole = BlockRunner(program, ids, batch_size=2)
    entering = torch.cat(whole.streams()).clone()
    whole.run_blocks()
    expected = whole.nll()
    monkeypatch.setattr(runner_module, "WHOLE_VOCABULARY_BYTES", 40 * 64 * 4)  # 40 rows of a 64-wide table
    read = []
    real_rows = program.store.rows
    monkeypatch.setattr(program.store, "rows", lambda name, *a, **kw: read.append(name) or real_rows(name, *a, **kw))
    rows = BlockRunner(program, ids, batch_size=2)
    assert torch.equal(torch.cat(rows.streams()), entering)
    assert len(read) == len(torch.unique(ids))  # one row per distinct token
    rows.run_blocks()
    got = rows.nll()
    chunks = -(-program.config.vocab_size // 40) if not rows.graphs.suffix_side_index else 0  # GPT-2's suffix
    assert len(read) - len(torch.unique(ids)) == chunks  # the head, 40 rows at a time, where the suffix is per token
    assert got[1] == expected[1] and got[0] == pytest.approx(expected[0], rel=1e-6)


@pytest.mark.parametrize("arch", archs("llama", "gpt2"))  # gpt2: Conv1D weights multiplied by addmm
def test_linear_weights_load_in_their_stored_dtype_and_compute_the_same(tmp_path, arch):
    """A bf16 checkpoint's linear weights are handed to a block in bf16 and cast by the block just before each linear
    (a 70B block is then never whole in float32); the block computes exactly what it does with float32 weights."""
    model = make_tiny(arch)
    model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    with parameters_on_meta():
        meta = type(model)(model.config)
    program = Program.from_checkpoint(meta, index_checkpoint(checkpoint_files(tmp_path)))
    ids = torch.randint(0, 300, (4, 12), generator=torch.Generator().manual_seed(0))
    runner = BlockRunner(program, ids, batch_size=4)
    linears = {lin.weight for lin in program.structure.in_blocks()}
    for k, block in enumerate(runner.graphs.blocks):
        assert block.cast == linears & set(block.weights) and len(block.cast) == {"llama": 7, "gpt2": 4}[arch]
        weights = runner.load(block)
        assert {n: w.dtype for n, w in zip(block.weights, weights) if w.is_floating_point()} == {
            n: torch.bfloat16 if n in block.cast else torch.float32 for n in block.weights}
        as_float32 = [program.store.get(n, torch.float32) for n in block.weights]
        for m in range(runner.batches):
            narrow, wide = block(weights, *runner.inputs(k, m)), block(as_float32, *runner.inputs(k, m))
            assert all(torch.equal(a, b) for a, b in zip(narrow, wide))
        casts = [n for n in block.module.graph.nodes if n.target == torch.ops.aten.to.dtype and n.args[0].op ==
                 "placeholder" and n.args[0].name.startswith("w_")]
        assert len(casts) == len(block.cast) and all(list(c.users) == [c.next] for c in casts)  # each just in time
        runner.step(k)
