"""From TRL's rollouts to what the hybrid loss needs, with the built-in loop's own maths.

TRL hands over prompts (lists of ids, no padding) and completions (lists of ids, ending
with EOS when they stopped). This module turns them into the trainer's `Batch` layout
(trainer/rollout.py: B rows, prompt + response right-padded, T = longest response), runs
the student once without gradient for its top-K ids and token log-probs (the built-in
loop records the same during sampling; TRL's generation, HF or vLLM, does not), and
builds the Dense support S and the teacher log-probs on it with the loop's own
`trainer.train.topk_support_and_teacher`. Shapes: B rows, T response positions, L = prompt +
response length, V vocabulary, K student top-K, K' support width, M teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from trainer.config import DenseConfig
from trainer.rollout import Batch, ResponseLogits, Rollouts
from trainer.teacher_source import TeacherOutput
from trainer.train import topk_support_and_teacher


def rollout_batch(
    prompt_ids: Sequence[Sequence[int]],  # B prompts
    completion_ids: Sequence[Sequence[int]],  # B completions
    group_size: int,
    pad_id: int,
) -> Batch:
    """The trainer's layout of TRL's rollouts; student_topk is left empty (-1) here."""
    B = len(prompt_ids)
    T = max(1, max((len(c) for c in completion_ids), default=0))
    rollouts = Rollouts(
        [list(map(int, p)) for p in prompt_ids],
        [list(map(int, c)) for c in completion_ids],
        [{} for _ in range(B)],
        torch.full((B, T, 1), -1, dtype=torch.int64),
        group_size,
    )
    return rollouts.layout(pad_id)


@torch.no_grad()
def student_topk_and_logprobs(
    lm: nn.Module, batch: Batch, k: int, rows_per_chunk: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-K ids int64 [B, T, K] with -1 on padding, log π(y_t) float32 [B, T] with 0 on
    padding) of the student at its current weights, `rows_per_chunk` rows at a time so
    that the [rows, T, V] logits stay small."""
    device = next(lm.parameters()).device
    head = ResponseLogits(lm)
    topk, lps = [], []
    for lo in range(0, batch.mask.shape[0], rows_per_chunk):
        sl = slice(lo, lo + rows_per_chunk)
        logits = head(batch.input_ids[sl].to(device), batch.positions[sl].to(device)).float()
        mask = batch.mask[sl].to(device).bool()
        ids = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
        topk.append(torch.where(mask.unsqueeze(-1), ids, -1).cpu())
        lp = logits.gather(-1, batch.targets[sl].to(device).unsqueeze(-1)).squeeze(-1)
        lp = lp - torch.logsumexp(logits, -1)
        lps.append(torch.where(mask, lp, 0.0).cpu())
    return torch.cat(topk), torch.cat(lps)


def dense_support(
    outputs: Sequence[TeacherOutput],  # M teachers, [B, T] layout
    student_topk: torch.Tensor,  # [N, K] int64, -1 on padding (N = B·T)
    vocab_size: int,
    cfg: DenseConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(support ids [N, K'] int64, teacher log-probs on it [M, N, K'] float32): the loop's
    own `topk_support_and_teacher`, for cfg.support "student", "teacher" or "union"."""
    if cfg.support == "full":
        raise ValueError(
            f"dense.support {cfg.support!r}: the TRL trainer takes a top-K support "
            "('student', 'teacher' or 'union'); 'full' needs full teacher logits"
        )
    return topk_support_and_teacher(student_topk.shape[0], vocab_size, outputs, student_topk, cfg)
