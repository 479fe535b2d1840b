"""Rollouts: G samples per prompt from the current student, and their training layout.

`sample` runs the student autoregressively with a KV cache (prompts left-padded so a
batch of different lengths decodes in lock-step), draws each token from
softmax(z / temperature) with the caller's torch.Generator (so a step's samples are a
function of its seed: resuming reproduces them), stops a row at its first stop id, and
keeps the student's top-K ids at every step: the Dense term's support S when it is the
student's (MATH.md § Top-K Dense gradient), sent to the teacher as query ids so that
nothing needs filling.

`Rollouts.layout` turns the samples into the training layout used everywhere after:
B = prompts × G rows (the G samples of a prompt consecutive), T = longest response;
row b, column t is about response token t of sample b.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Batch:
    """The training layout of a set of rollouts.

    Attributes:
        input_ids: int64 [B, L] prompt + response, right-padded with pad_id.
        starts: int64 [B] index of each row's first response token.
        positions: int64 [B, T] input position whose output predicts response token t
            (start − 1 + t; clamped on padding).
        targets: int64 [B, T] response token t (pad_id on padding).
        mask: float32 [B, T] 1 on response tokens, 0 on padding.
        student_topk: int64 [B, T, K] the student's top-K ids at each step (-1 on padding).
    """

    input_ids: torch.Tensor
    starts: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    student_topk: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum().item())


@dataclass(frozen=True)
class Rollouts:
    """B samples: prompts repeated G times (consecutive), responses incl. the stop id."""

    prompt_ids: list[list[int]]  # B
    response_ids: list[list[int]]  # B, each ends with a stop id when the row stopped
    metas: list[Mapping]  # B, the prompt's JSONL fields (for the rewards)
    student_topk: torch.Tensor  # int64 [B, T, K], -1 after a row's end
    group_size: int

    def layout(self, pad_id: int) -> Batch:
        """The right-padded training layout (see Batch)."""
        B = len(self.prompt_ids)
        T = max(1, max(len(r) for r in self.response_ids))
        seqs = [p + r for p, r in zip(self.prompt_ids, self.response_ids, strict=True)]
        L = max(len(s) for s in seqs)
        input_ids = torch.full((B, L), pad_id, dtype=torch.int64)
        for b, s in enumerate(seqs):
            input_ids[b, : len(s)] = torch.tensor(s, dtype=torch.int64)
        starts = torch.tensor([len(p) for p in self.prompt_ids], dtype=torch.int64)
        lengths = torch.tensor([len(r) for r in self.response_ids], dtype=torch.int64)
        t = torch.arange(T).unsqueeze(0)  # [1, T]
        mask = t < lengths.unsqueeze(1)  # [B, T]
        positions = (starts.unsqueeze(1) - 1 + t).clamp_max(L - 1)
        targets = torch.where(mask, input_ids.gather(1, (positions + 1).clamp_max(L - 1)), pad_id)
        topk = self.student_topk[:, :T]
        if topk.shape[1] < T:  # a batch that sampled nothing (max_new_tokens = 0) has T = 1
            topk = torch.full((B, T, topk.shape[-1]), -1, dtype=torch.int64)
        return Batch(input_ids, starts, positions, targets, mask.float(), topk)


class ResponseLogits(nn.Module):
    """Student forward over prompt + response -> logits at the response rows only.

    Runs the causal LM's decoder once over [B, L] and applies the LM head to the [B, T]
    gathered rows, so [B, L, V] logits never exist. A module (not a function) so that
    DistributedDataParallel can wrap it: DDP synchronises gradients only for work done
    inside its wrapped forward.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], positions [B, T] -> logits [B, T, V]."""
        hidden = self.lm.get_decoder()(input_ids=input_ids).last_hidden_state  # [B, L, H]
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return self.lm.get_output_embeddings()(hidden.gather(1, idx))


@torch.no_grad()
def sample(
    lm: nn.Module,
    prompts: Sequence[Sequence[int]],
    metas: Sequence[Mapping],
    *,
    group_size: int,
    temperature: float,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    keep_topk: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Rollouts:
    """Samples `group_size` responses per prompt; temperature 0 means greedy.

    `generator` must live on the student's device.

    Returns Rollouts with B = len(prompts) × group_size rows. The student's top-K is
    taken from its raw logits (temperature does not change the order).
    """
    device = next(lm.parameters()).device
    rows = [list(p) for p in prompts for _ in range(group_size)]
    row_metas = [m for m in metas for _ in range(group_size)]
    B = len(rows)
    P = max(len(r) for r in rows)
    ids = torch.full((B, P), pad_id, dtype=torch.int64)
    attn = torch.zeros((B, P), dtype=torch.int64)
    for b, r in enumerate(rows):  # left-pad: every row's next token is at column P
        ids[b, P - len(r) :] = torch.tensor(r, dtype=torch.int64)
        attn[b, P - len(r) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    stops = torch.tensor(list(stop_ids), dtype=torch.int64, device=device)

    # transformers >= 5 names the KV cache `cache`; 4.x named it `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    out = lm(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
    cache, logits = getattr(out, cache_kw), out.logits[:, -1].float()  # [B, V]
    next_pos = pos[:, -1:] + 1
    tokens, topks = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        topks.append(torch.where(done.unsqueeze(-1), -1, logits.topk(keep_topk, dim=-1).indices))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, pad_id, tok)
        tokens.append(tok)
        done = done | torch.isin(tok, stops)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        out = lm(
            input_ids=tok.unsqueeze(-1),
            attention_mask=attn,
            position_ids=next_pos,
            use_cache=True,
            **{cache_kw: cache},
        )
        cache, logits = getattr(out, cache_kw), out.logits[:, -1].float()
        next_pos = next_pos + 1

    K = keep_topk
    topk = torch.stack(topks, 1).cpu() if topks else torch.full((B, 0, K), -1)
    sampled = torch.stack(tokens, 1).cpu().tolist() if tokens else [[] for _ in range(B)]
    stop_set = set(stop_ids)
    responses = []
    for row in sampled:
        resp: list[int] = []
        for tok in row:
            resp.append(int(tok))
            if tok in stop_set:
                break
        responses.append(resp)
    return Rollouts(rows, responses, row_metas, topk, group_size)
