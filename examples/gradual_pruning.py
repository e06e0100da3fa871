"""Gradual magnitude pruning while fine-tuning, on the CPU: raise sparsity on the cubic schedule, print perplexity.

    .venv/bin/python examples/gradual_pruning.py --model tiny-llama --steps 40          # seconds
    .venv/bin/python examples/gradual_pruning.py --model smollm2-135m --steps 200 --batch 2   # 20 min here (2 cores, shared)

The model is fine-tuned on windows of the built-in calibration text (the Austen training novels) with AdamW; every
``--every`` steps the masks are recomputed at the scheduled sparsity. Perplexity is measured on the evaluation windows
(Emma + Persuasion) before, at each stage and at the end, and beside it one-shot magnitude pruning at the final sparsity
without fine-tuning.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys

import torch

from nexus_export.api.pruning import CubicSparsityScheduler, MagnitudePruner, apply_sparsity, evaluate_perplexity
from nexus_export.data import calibration_windows, evaluation_windows
from nexus_export.models.zoo import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--final-sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25, help="steps between mask updates")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--eval-windows", type=int, default=16)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    evals = evaluation_windows(tokenizer, "austen", args.eval_windows, args.seq_len)
    train = calibration_windows(tokenizer, "austen", args.steps * args.batch, args.seq_len, seed=1)

    def ppl(m) -> float:
        return evaluate_perplexity(m, evals)

    print(f"{args.model}: dense perplexity {ppl(model):.2f} ({args.eval_windows} windows x {args.seq_len} tokens)")
    one_shot = copy.deepcopy(model)
    MagnitudePruner(sparsity=args.final_sparsity).prune_model(one_shot)
    print(f"one-shot magnitude {args.final_sparsity:.0%}, no fine-tuning: perplexity {ppl(one_shot):.2f}")
    del one_shot

    scheduler = CubicSparsityScheduler(0.0, args.final_sparsity, total_steps=int(args.steps * 0.8))
    masks = apply_sparsity(model, scheduler.sparsity(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    for step in range(args.steps):
        if step % args.every == 0:
            masks.update(scheduler.sparsity(step))
        ids = train[step * args.batch:(step + 1) * args.batch]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            model.eval()
            print(f"step {step + 1:4d}: sparsity {masks.sparsity():.1%}, train loss {loss.item():.3f}, "
                  f"perplexity {ppl(model):.2f}", flush=True)
            model.train()
    masks.update(args.final_sparsity)
    model.eval()
    print(f"final: sparsity {masks.sparsity():.1%}, perplexity {ppl(model):.2f}")
    masks.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
