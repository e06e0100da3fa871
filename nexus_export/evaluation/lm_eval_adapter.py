"""The lm-eval model nexus-export scores with: log-likelihoods of continuations from a logits function.

Imported only once lm-eval is known to be installed (``zero_shot.check_tasks``). Requests are scored ``BATCH`` at a
time, padded on the right (the causal mask keeps each one independent of the padding), longest first.
"""

from __future__ import annotations

from typing import Callable

import torch
from lm_eval.api.model import LM

from nexus_export.errors import UserError
from nexus_export.progress import Progress

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids [b, t], mask [b, t]) -> logits [b, t, v]

BATCH = 16


class LogitsLM(LM):
    """An lm-eval model over ``logits_fn``: log-likelihoods of continuations, scored ``BATCH`` requests at a time."""

    def __init__(self, logits_fn: LogitsFn, tokenizer, max_length: int, what: str, bos: int | None = None):
        """``bos``: a token id put before every request (the run's --bos choice), so a model trained with one is
        scored as it was trained."""
        super().__init__()
        self.logits_fn, self.tokenizer, self.max_length, self.what = logits_fn, tokenizer, max_length, what
        self.bos = bos

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = request.args
            whole, ctx = self._encode(context + continuation), self._encode(context)
            if not context or whole[:len(ctx)] != ctx:  # the boundary merged into one token: encode apart
                whole = ctx + self._encode(continuation)
            n_cont = max(1, len(whole) - len(ctx))
            if self.bos is not None:
                whole = [self.bos] + whole
            elif not ctx:  # an empty context: the continuation is predicted from the end-of-text token
                whole = [self.tokenizer.eos_token_id or 0] + whole
            pairs.append((whole[-(self.max_length + 1):], n_cont))
        return self._score(pairs)

    def _score(self, pairs: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        progress = Progress(f"{self.what} zero-shot", len(pairs), "requests", every_s=15.0)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))  # similar lengths batched
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in range(0, len(order), BATCH):
            chunk = order[start:start + BATCH]
            inputs = [pairs[i][0][:-1] for i in chunk]
            width = max(len(x) for x in inputs)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, :len(x)] = torch.tensor(x)
                mask[row, :len(x)] = 1
            logits = torch.as_tensor(self.logits_fn(ids, mask))
            for row, i in enumerate(chunk):
                tokens, n_cont = pairs[i]
                targets = torch.tensor(tokens[-n_cont:])
                positions = torch.arange(len(tokens) - 1 - n_cont, len(tokens) - 1)
                picked = torch.log_softmax(logits[row, positions].double(), dim=-1)  # the continuation's rows only
                results[i] = (float(picked.gather(1, targets[:, None]).sum()),
                              bool((picked.argmax(-1) == targets).all()))
            progress.update(min(start + BATCH, len(order)))
        return results

    def loglikelihood_rolling(self, requests):
        raise UserError("nexus-export scores multiple-choice lm-eval tasks only (this task asks for rolling "
                        "log-likelihoods: use the run's perplexity instead)")

    def generate_until(self, requests):
        raise UserError("nexus-export scores multiple-choice lm-eval tasks only (this task generates text)")
