"""From teacher logits rows to the scored summary: top-K, token, query ids, leftover mass.

Shared by the PyTorch backend (which feeds it hidden-state chunks through the LM head)
and by tests as the float32 reference. All maths is float32 over the full vocabulary:

    logp   = log_softmax(logits / temperature)                 [N, V]
    topk   = the K largest logp, sorted descending             [N, K]
    token  = logp[target]                                      [N]
    query  = logp[query_ids]                                   [N, Q]
    leftover = logsumexp(logp over ids not in topk)            [N]

The leftover is summed from the complement directly rather than as log(1 - Σ exp(topk)),
which would lose every digit when the top-K holds nearly all the mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class RowScores:
    """Scores for N rows with a common top-K width K (callers slice per item)."""

    topk_ids: torch.Tensor  # int64 [N, K]
    topk_logprobs: torch.Tensor  # float32 [N, K]
    token_logprobs: torch.Tensor  # float32 [N]
    query_logprobs: torch.Tensor | None  # float32 [N, Q] or None
    leftover_logmass: torch.Tensor  # float32 [N]; per-row k, see summarize_rows


def summarize_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    row_k: torch.Tensor,
    row_temperature: torch.Tensor,
    query_ids: torch.Tensor | None = None,
) -> RowScores:
    """Summarises a chunk of rows that may come from different requests.

    Args:
        logits: [N, V] teacher logits (any float dtype; upcast to float32 here).
        targets: int64 [N] the token that actually followed each row.
        row_k: int64 [N] each row's requested top-K (rows of one item share it).
        row_temperature: float32 [N] each row's temperature.
        query_ids: int64 [N, Q] ids to gather per row (pad unused slots with any valid
            id and slice them off), or None.

    Returns:
        RowScores with K = max(row_k); row i's leftover excludes only its own first
        row_k[i] ids. The only [N, V] float32 buffer is `logp`, reused in place.
    """
    logp = torch.log_softmax(logits.float() / row_temperature[:, None], dim=-1)
    vocab = logp.shape[-1]
    k_max = int(row_k.max().item()) if row_k.numel() else 1
    k_max = min(k_max, vocab)
    top_lp, top_ids = torch.topk(logp, k_max, dim=-1, sorted=True)
    token_lp = logp.gather(1, targets[:, None]).squeeze(1)
    query_lp = logp.gather(1, query_ids) if query_ids is not None else None

    # Mask each row's own top-k ids out of the vocabulary (in place: logp is not needed
    # after the gathers above) and sum what is left.
    within_k = torch.arange(k_max, device=logp.device)[None, :] < row_k[:, None]  # [N, K]
    logp.scatter_(1, top_ids, torch.where(within_k, float("-inf"), top_lp))
    leftover = torch.logsumexp(logp, dim=-1)
    return RowScores(top_ids, top_lp, token_lp, query_lp, leftover)
