"""Evaluation for the demo: greedy accuracy on held-out prompts and KL to the teacher.

accuracy   fraction of prompts whose greedy response is exactly the answer (+ <eos>)
token_acc  mean `token_accuracy` reward of the greedy responses
reward     mean of the trainer's combined reward on temperature-1 samples, the
           quantity the objective maximises (r = Σ_j α_j r_j)
kl         mean per-token KL(student ‖ teacher) over the full vocabulary, on the
           student's own temperature-1 samples (exact, not top-K)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.rewards import RewardFn, exact_match, token_accuracy
from trainer.rollout import ResponseLogits, sample

_STOP = (2,)


@torch.no_grad()
def evaluate(
    lm: nn.Module,
    examples: Sequence[dict],
    reward_fns: Sequence[RewardFn],
    reward_weights: Sequence[float],
    teacher: nn.Module | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, float]:
    """The metrics above for `lm` (and its KL to `teacher` when given)."""
    lm.eval()
    max_new = max(len(e["answer"]) for e in examples) + 1
    sums = {"accuracy": 0.0, "token_acc": 0.0, "reward": 0.0, "kl": 0.0}
    kl_tokens = 0.0
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, len(examples), batch_size):
        chunk = list(examples[i : i + batch_size])
        prompts, metas = [e["prompt"] for e in chunk], chunk
        common = dict(max_new_tokens=max_new, stop_ids=_STOP, keep_topk=1, pad_id=0, group_size=1)
        greedy = sample(lm, prompts, metas, temperature=0.0, **common)
        for p, r, m in zip(greedy.prompt_ids, greedy.response_ids, metas, strict=True):
            sums["accuracy"] += exact_match(p, r, m)
            sums["token_acc"] += token_accuracy(p, r, m)
        sampled = sample(lm, prompts, metas, temperature=1.0, generator=gen, **common)
        for p, r, m in zip(sampled.prompt_ids, sampled.response_ids, metas, strict=True):
            sums["reward"] += sum(
                w * fn(p, r, m) for fn, w in zip(reward_fns, reward_weights, strict=True)
            )
        if teacher is not None:
            batch = sampled.layout(pad_id=0)
            ls = torch.log_softmax(ResponseLogits(lm)(batch.input_ids, batch.positions), -1)
            lq = torch.log_softmax(ResponseLogits(teacher)(batch.input_ids, batch.positions), -1)
            kl = (ls.exp() * (ls - lq)).sum(-1)  # [B, T]
            sums["kl"] += float((kl * batch.mask).sum())
            kl_tokens += float(batch.mask.sum())
    n = len(examples)
    out = {k: v / n for k, v in sums.items() if k != "kl"}
    if teacher is not None:
        out["kl"] = sums["kl"] / max(kl_tokens, 1.0)
    return out
