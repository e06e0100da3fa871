"""The Python API: the pruner classes as users write them, on tiny-llama, against the CLI and the passes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from nexus_export.api.pruning import (
    CubicSparsityScheduler,
    DynamicPruner,
    GPTQQuantizer,
    NMSparsityPruner,
    SparseGPTConfig,
    SparseGPTPruner,
    WandaPruner,
    apply_sparsity,
    calibration_tensor,
    evaluate_perplexity,
    export_onnx,
)
from nexus_export.cli import main
from nexus_export.data import calibration_windows, evaluation_windows
from nexus_export.errors import UserError
from nexus_export.models.zoo import load_model

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture()
def tiny():
    loaded = load_model("tiny-llama")
    return loaded.model, loaded.tokenizer


def loader(tokenizer, n=8, seq=64, as_dicts=False):
    ids = calibration_windows(tokenizer, "austen", n, seq, 0)
    data = [{"input_ids": row} for row in ids] if as_dicts else ids
    return DataLoader(data, batch_size=4)


@pytest.mark.slow
def test_same_masks_as_the_cli(tiny, tmp_path):
    model, tok = tiny
    SparseGPTPruner(SparseGPTConfig(sparsity=0.5)).prune_model(model, loader(tok, n=8, seq=64), nsamples=8)
    out = tmp_path / "cli"
    assert main(["-q", "prune", "--model", "tiny-llama", "--method", "sparsegpt", "--sparsity", "0.5",
                 "--calib-samples", "8", "--seq-len", "64", "--eval-windows", "2", "--no-latency", "--save-hf",
                 "--out", str(out)]) == 0  # in this process: the same threads, so the same sums' order
    cli = load_file(str(out / "hf" / "model.safetensors"))
    for name, param in model.named_parameters():
        if name.endswith("proj.weight"):
            assert torch.equal(cli[name] == 0, param == 0), name
            assert torch.allclose(cli[name], param, atol=1e-6), name


def test_per_layer_dict_is_accepted_as_sparsity(tiny):
    model, tok = tiny
    metrics = WandaPruner(sparsity={"layer_0": 0.3, "mlp_out": 0.5}).prune_model(model, loader(tok), nsamples=8)
    per = metrics["per_layer_sparsity"]
    assert per["model.layers.0.self_attn.q_proj"] == pytest.approx(0.3, abs=0.01)
    assert per["model.layers.1.mlp.down_proj"] == pytest.approx(0.5)
    assert "model.layers.1.self_attn.q_proj" not in per  # not in the dict: left dense


@pytest.mark.slow
def test_export_and_evaluate_in_three_lines(tiny, tmp_path):
    model, tok = tiny
    evals = evaluation_windows(tok, "austen", 2, 64)
    dense = evaluate_perplexity(model, evals)
    WandaPruner(sparsity=0.5).prune_model(model, loader(tok), nsamples=8)
    path = export_onnx(model, tmp_path / "model.onnx")
    pruned = evaluate_perplexity(model, evals)
    from runtimes import ort

    assert path.is_file() and dense != pruned
    assert ort.perplexity(ort.session(path), evals)[0] == pytest.approx(pruned, rel=1e-4)
    model.train()
    evaluate_perplexity(model, evals)
    assert model.training


@pytest.mark.parametrize("data, nsamples, message", [
    ([torch.randn(2, 8)], None, "token ids"),
    (["some text"], None, "yielded str"),
    ([{"text": "x"}], None, "without 'input_ids'"),
    ([torch.ones(2, 8, dtype=torch.long)], 5, "provides only 2 samples"),
    ([torch.ones(2, 8, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], None, "different lengths"),
])
def test_bad_calibration_data(data, nsamples, message):
    with pytest.raises(UserError, match=message):
        calibration_tensor(data, nsamples)


def test_bad_pruner_settings(tiny):
    with pytest.raises(UserError, match="0 < n < m"):
        NMSparsityPruner(n=4, m=4)
    with pytest.raises(UserError, match="needs calibration data"):
        WandaPruner(0.5).prune_model(tiny[0])
    with pytest.raises(UserError, match="torch.export could not capture"):
        class Untraceable(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(10, 4)

            def forward(self, input_ids, attention_mask):
                h = self.emb(input_ids)
                return h * 2 if h.sum() > 0 else h

        WandaPruner(0.5).prune_model(Untraceable(), [torch.ones(1, 8, dtype=torch.long)])


def test_cubic_schedule():
    s = CubicSparsityScheduler(0.0, 0.5, total_steps=100)
    assert s.sparsity(0) == 0.0 and s.sparsity(100) == 0.5 and s.sparsity(1000) == 0.5
    assert s.sparsity(50) == pytest.approx(0.5 - 0.5 * 0.125)
    values = [s.sparsity(t) for t in range(0, 101, 10)]
    assert values == sorted(values)
    for bad in (dict(total_steps=0), dict(initial_sparsity=0.6)):
        with pytest.raises(UserError):
            CubicSparsityScheduler(**{"initial_sparsity": 0.0, "final_sparsity": 0.5, "total_steps": 10, **bad})


def test_masks_survive_optimizer_steps(tiny):
    model, tok = tiny
    masks = apply_sparsity(model, 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = calibration_windows(tok, "austen", 2, 32, 0)
    for _ in range(2):  # dense steps first: the optimizer's momentum holds every weight
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    masks.update(0.5)
    w = model.model.layers[0].mlp.up_proj.weight
    zeros = (w == 0).clone()
    before = w.detach().clone()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()  # AdamW with weight decay: masked gradients keep masked weights at exactly zero
        optimizer.zero_grad()
        assert bool((w[zeros] == 0).all())
    assert not torch.equal(w[~zeros], before[~zeros])  # the kept weights did train
    assert masks.sparsity() == pytest.approx(0.5)
    masks.remove()


@pytest.mark.slow
def test_gradual_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gradual_pruning.py"), "--model", "tiny-llama",
                           "--steps", "6", "--every", "3", "--seq-len", "32", "--eval-windows", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert "final: sparsity 50.0%" in proc.stdout and "one-shot magnitude 50%" in proc.stdout


@pytest.mark.slow
def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The manual's Python API block, executed as written (in a scratch folder for its out/ path)."""
    text = (ROOT / "docs" / "python-api.md").read_text()
    block = text.split("```python", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    namespace: dict = {}
    exec(compile(block, "python-api.md", "exec"), namespace)
    assert (tmp_path / "out" / "model.onnx").is_file()
    metrics, model = namespace["metrics"], namespace["model"]
    assert metrics["achieved_sparsity"] == pytest.approx(0.5) and len(metrics["per_layer_sparsity"]) == 14
    assert metrics["params_before"] == metrics["params_after"] and metrics["report"]["name"] == "sparsegpt"
    assert namespace["short"]["model"].config.num_hidden_layers == 1
    assert len(model.model.layers) == 2  # structural pruners return a new model: the given one keeps its blocks
    assert set(namespace["sliced"]["widths"].values()) == {48}
    assert namespace["sliced"]["params_after"] < namespace["sliced"]["params_before"]
    w = model.model.layers[0].mlp.up_proj.weight  # the masking pruners wrote into the model: 2:4 last
    assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


@pytest.mark.slow
def test_dynamic_pruner_and_the_seeds_global_threshold(tiny):
    """DynamicPruner leaves the model as it was and returns a module applying per-input thresholds at the target;
    the seed's prune_by_activation applies one global threshold to this input only: its logits are the model's with
    hooks doing x * (|x| >= t) in front of every decoder linear, and the model keeps its weights and has no hooks."""
    model, tokenizer = tiny
    before = {n: p.clone() for n, p in model.state_dict().items()}
    pruner = DynamicPruner(sparsity=0.5)
    metrics = pruner.prune_model(model, loader(tokenizer))
    assert metrics["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert len(metrics["thresholds"]) == 4 * len(model.model.layers)
    ids = evaluation_windows(tokenizer, "austen", 2, 64)
    assert torch.allclose(metrics["model"](ids, torch.ones_like(ids)), metrics["program"].logits(ids))

    t = min(metrics["thresholds"].values())  # below every calibrated one: no input loses all its entries
    result = pruner.prune_by_activation(model, ids, t)
    hooks = [m.register_forward_pre_hook(lambda module, args: (args[0] * (args[0].abs() >= t),))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    assert torch.allclose(result["logits"], expected, atol=1e-5, rtol=1e-5)
    assert 0.05 < result["sparsity"] < 0.5 and 0 < result["skippable_macs"] < 1
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    with pytest.raises(UserError, match="zeroes every entry"):
        pruner.prune_by_activation(model, ids, 1e9)
    with pytest.raises(UserError, match="threshold must be a number"):
        pruner.prune_by_activation(model, ids, -1.0)
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        DynamicPruner(sparsity=1.0)


@pytest.mark.slow
def test_prune_then_gptq_then_export_as_the_seed_writes_it(tiny, tmp_path):
    """SparseGPTPruner, then GPTQQuantizer(bits=4), then export_onnx: the model holds the dequantized weights (2:4
    zeros kept), the program exports as MatMulNBits with the same function."""
    from runtimes import ort
    from runtimes.quantize import dequantized_weights

    model, tok = tiny
    SparseGPTPruner(pruning_config=SparseGPTConfig(pattern="2:4")).prune_model(model, loader(tok), nsamples=8)
    zeros = model.model.layers[0].mlp.down_proj.weight == 0
    metrics = GPTQQuantizer(bits=4, group_size=32).quantize_model(model, loader(tok), nsamples=8)
    assert metrics["layers"] == 14 and metrics["report"]["name"] == "gptq" and metrics["wall_seconds"] > 0
    w = model.model.layers[0].mlp.down_proj.weight  # in place, and still 2:4
    assert torch.all(w[zeros] == 0) and bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    float_path = export_onnx(model, tmp_path / "model.onnx")
    int4_path = export_onnx(metrics["program"], tmp_path / "model.q4.onnx")
    assert torch.equal(torch.from_numpy(dequantized_weights(int4_path)["model.layers.0.mlp.down_proj"]).t(), w)
    ids = calibration_windows(tok, "austen", 2, 32, 1)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    for path in (float_path, int4_path):
        assert abs(ort.logits(ort.session(path), ids.numpy()) - expected).max() < 1e-4
    assert list(tmp_path.iterdir()) and not [p for p in tmp_path.iterdir() if p.name.startswith(".export-")]


def test_gptq_quantizer_refusals(tiny):
    model, _ = tiny
    with pytest.raises(UserError, match="bits must be 4 or 8"):
        GPTQQuantizer(bits=3)
    with pytest.raises(UserError, match="needs calibration data"):
        GPTQQuantizer(group_size=32).quantize_model(model, None)
    with pytest.raises(UserError, match="group size 128 does not divide the input width 64"):
        GPTQQuantizer(group_size=128).quantize_model(model, torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(UserError, match=r"8-bit grids apart; use --dtype fp32 \(Python API: model.float\(\)\)"):
        GPTQQuantizer(bits=8, group_size=32).quantize_model(model.to(torch.bfloat16),
                                                            torch.ones(2, 16, dtype=torch.long))



def test_an_n_m_pruner_with_permute_writes_the_permuted_model_back(tiny):
    model, tok = tiny
    ids = evaluation_windows(tok, "austen", 1, 32)
    embed = model.model.embed_tokens.weight.detach().clone()
    metrics = NMSparsityPruner(n=2, m=4, method="magnitude", permute=True).prune_model(model)
    assert metrics["report"]["changes"]["permutation"]["applied"]
    # the stream's channels moved: the embedding holds the same columns in another order
    moved = model.model.embed_tokens.weight.detach()
    assert not torch.equal(moved, embed)
    assert torch.equal(moved.sort(dim=1).values, embed.sort(dim=1).values)
    # and every permuted tensor went back into the model: it computes what the pruned program computes
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.allclose(logits, metrics["program"].logits(ids), atol=1e-4)
