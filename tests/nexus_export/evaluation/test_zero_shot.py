"""Zero-shot accuracy through lm-eval: the adapter scores what lm-eval's own Hugging Face model scores, task names are
checked before any work, and a missing lm-eval says how to install it."""

import builtins
from pathlib import Path

import pytest
import torch
from conftest import needs_lm_eval

from nexus_export import distributed
from nexus_export.cli import main
from nexus_export.errors import UserError
from nexus_export.evaluation.zero_shot import ZeroShot, check_tasks
from nexus_export.graph.program import Program
from nexus_export.models.zoo import load_model
from nexus_export.run.recipe import EvaluationSettings

ROOT = Path(__file__).resolve().parents[3]
TASKS = str(ROOT / "tests" / "nexus_export" / "data" / "zero_shot")


@needs_lm_eval
def test_the_adapter_scores_what_lm_evals_hugging_face_model_scores():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from nexus_export.evaluation.lm_eval_adapter import LogitsLM

    loaded = load_model("tiny-llama")
    program = Program.from_loaded(loaded)
    pairs = [("Mrs. Bennet had five", " daughters."), ("Jane wrote", " a long letter to her sister."),
             ("", "Hello there"), ("It is a truth universally acknowledged", ",")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    ours = LogitsLM(lambda ids, mask: program.logits(ids, mask), loaded.tokenizer, 512, "dense").loglikelihood(requests)
    hflm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1, device="cpu")
    theirs = hflm.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-5) and greedy_a == greedy_b
    assert len({round(a, 3) for a, _ in ours}) == len(pairs)  # four different answers, not one repeated

    # with the run's BOS (--bos), every request starts with it, as the evaluation windows do
    with_bos = LogitsLM(lambda ids, mask: program.logits(ids, mask), loaded.tokenizer, 512, "dense", bos=7)
    (score, _), = with_bos.loglikelihood(requests[:1])
    ids = [7] + loaded.tokenizer("Mrs. Bennet had five daughters.", add_special_tokens=False)["input_ids"]
    n = len(loaded.tokenizer(" daughters.", add_special_tokens=False)["input_ids"])
    logprobs = torch.log_softmax(program.logits(torch.tensor([ids[:-1]])).double(), -1)[0]
    expected = sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
    assert score == pytest.approx(expected, rel=1e-6) and score != pytest.approx(ours[0][0], rel=1e-3)


@needs_lm_eval
def test_the_dense_accuracy_is_cached_like_the_dense_perplexity():
    """A second run on the same weights reads the dense accuracies from the evaluation cache (a sweep scores the dense
    model once); the tasks, limit or weights changing is a new entry."""
    loaded = load_model("tiny-llama")
    program = Program.from_loaded(loaded)
    ev = EvaluationSettings(tasks=["tiny_choice"], task_limit=4, task_paths=[TASKS])
    first = ZeroShot.check(ev, loaded)
    first.dense(program, torch.device("cpu"), distributed.world())
    second = ZeroShot.check(ev, loaded)
    second.dense(program, torch.device("cpu"), distributed.world())
    assert not first.dense_from_cache and second.dense_from_cache
    assert second.scores["tiny_choice"]["dense"] == first.scores["tiny_choice"]["dense"]
    assert set(first.scores["tiny_choice"]["dense"]) == {"acc", "acc_norm"}
    other = EvaluationSettings(tasks=["tiny_choice"], task_limit=3, task_paths=[TASKS])
    third = ZeroShot.check(other, loaded)
    third.dense(program, torch.device("cpu"), distributed.world())
    assert not third.dense_from_cache


@needs_lm_eval
def test_task_folders_are_checked():
    assert "tiny_choice" in check_tasks(["tiny_choice"], [TASKS]).all_tasks
    with pytest.raises(UserError, match="not a folder of lm-eval task YAML"):
        check_tasks(["tiny_choice"], [TASKS + "-missing"])


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--eval-tasks", "tiny_choise", "--eval-include", TASKS], "close names: tiny_choice"),
    (["--eval-tasks", "tiny_choice,", "--eval-include", TASKS], "has an empty entry; e.g. --eval-tasks hellaswag"),
    (["--eval-tasks", "tiny_choice", "--eval-limit", "0", "--eval-include", TASKS], "task_limit must be positive"),
])
def test_bad_task_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    assert main(["prune", "--model", "tiny-llama", "--method", "magnitude", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_without_lm_eval_the_error_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    assert main(["prune", "--model", "tiny-llama", "--method", "magnitude", "--eval-tasks", "hellaswag",
                 "--out", str(tmp_path / "o")]) == 2
    assert "pip install 'nexus-export[eval]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
