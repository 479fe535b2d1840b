"""Top-K support sets and the teacher log-probs on them (the fill rule). Pure torch, no Triton.

MATH.md § Top-K Dense gradient: the Dense term is evaluated on a support S of K ids per row.
This file builds S (the student's top-K as the paper prescribes, the teacher's top-K, or
their union) and the teacher's log q_i for i ∈ S from what the teacher service returns per
position: its top-K ids and log-probs, log-probs at any query ids the trainer sent, and the
log of the mass left outside its top-K.

Fill rule (used whenever the teacher did not return log q_i for a support id i).
Let R be the ids the teacher returned a log-prob for at that row (top-K ∪ query ids),
n_R = |R|, and ℓ the teacher mass outside R:

    ℓ = exp(leftover_logmass) − Σ_{i ∈ R, i ∉ top-K} q_i          (leftover is outside top-K)
    log q_i = log(max(ℓ, FILL_MIN_MASS)) − log(V − n_R)      for every i ∈ S ∖ R

i.e. the leftover mass is spread evenly over the ids the teacher did not return. The floor
keeps log q finite when the teacher's top-K already holds (numerically) all its mass. The
best option is still to send S as query ids so that nothing needs filling.

Support ids are int64 [N, K]; -1 marks padding (a union has a varying size per row).
S is a set: check_support_ids rejects ids outside [-1, V), and dedupe_support keeps the
first copy of an id repeated within a row and turns later copies into padding, so that
P_S and the loss count every id once (topk_kl applies both before anything else).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

TopKMode = Literal["sparse", "exact", "renorm"]
SupportKind = Literal["student", "teacher", "union"]

# Floor on the teacher's leftover mass before it is spread (see the fill rule above).
FILL_MIN_MASS = 1e-30


class TopKKLResult(NamedTuple):
    """Per-row outputs of topk_kl, all [N] fp32.

    kl: ρ_n × the mode's loss (kl_S for "sparse"/"exact", KL of the renormalised
        distributions for "renorm"); differentiable w.r.t. the student logits.
    student_mass: P_S = Σ_{i∈S} softmax(z)_i (0 on masked rows); no gradient.
    tail: (1 − P_S)(kl_S + W P_S) = Σ_{j∉S} p_j (kl_S + W P_S), the total size of the
        off-support gradient −p_j (kl_S + W P_S) that the sparse mode drops (W = Σ w_m;
        0 on masked rows); no gradient.
    """

    kl: torch.Tensor
    student_mass: torch.Tensor
    tail: torch.Tensor


def fill_missing_teacher_logprobs(
    teacher_logprobs_at_support: torch.Tensor,  # [M, N, K] or [N, K]; NaN = not returned
    support_ids: torch.Tensor,  # [N, K] int64, -1 = padding
    vocab_size: int,
    teacher_leftover_logmass: torch.Tensor | None = None,  # [M, N] or [N]
    teacher_num_returned: torch.Tensor | int | None = None,  # [M, N] or [N] or int: n_R
    teacher_known: torch.Tensor | None = None,  # bool like the log-probs; False = missing
    row_weights: torch.Tensor | None = None,  # [N]; rows with weight 0 are never filled
) -> torch.Tensor:
    """Apply the fill rule; returns fp32 [M, N, K] with finite values on every valid slot.

    A slot is missing where teacher_known is False, or (without teacher_known) where the
    log-prob is NaN. n_R defaults to the number of known valid slots in the row, which is
    right when S contains every id the teacher returned (teacher or union support).
    A row whose row_weights entry is 0 is masked: its slots are 0, whatever they held
    (NaN padding included), and never count as missing.
    """
    lp = teacher_logprobs_at_support
    if lp.dim() == 2:
        lp = lp.unsqueeze(0)
    lp = lp.to(torch.float32)
    valid = (support_ids.to(lp.device) >= 0).unsqueeze(0)  # [1, N, K]
    if row_weights is not None:
        live = row_weights.detach().reshape(-1).to(device=valid.device) != 0  # [N]
        valid = valid & live.view(1, -1, 1)
    known = ~torch.isnan(lp) if teacher_known is None else teacher_known.reshape(lp.shape)
    missing = valid & ~known
    if not bool(missing.any()):  # a host sync; only when the caller passes unfilled data
        return torch.where(valid, lp, 0.0)
    if teacher_leftover_logmass is None:
        raise ValueError(
            "topk_kl: some support ids have no teacher log-prob (NaN or teacher_known=False); "
            "pass teacher_leftover_logmass so the fill rule can spread the leftover mass"
        )
    left = teacher_leftover_logmass.to(torch.float32).reshape(lp.shape[:2])  # [M, N]
    if teacher_num_returned is None:
        n_r = (valid & known).sum(-1).to(torch.float32)
    else:
        n_r = torch.as_tensor(teacher_num_returned, dtype=torch.float32, device=lp.device)
        n_r = n_r.reshape(-1, lp.shape[1]) if n_r.dim() else n_r.expand(lp.shape[:2])
    fill = _spread(left.exp(), n_r, vocab_size)  # [M, N]
    return torch.where(missing, fill.unsqueeze(-1), torch.where(valid, lp, 0.0))


def check_support_ids(support_ids: torch.Tensor, num_rows: int, vocab_size: int) -> None:
    """Raise ValueError unless support_ids is an integer [num_rows, K] tensor with every entry
    in [-1, vocab_size) (-1 = padding). One host sync (the min/max), so callers check once."""
    if support_ids.dtype.is_floating_point or support_ids.dtype == torch.bool:
        raise ValueError(f"support_ids must be an integer tensor, got {support_ids.dtype}")
    if support_ids.dim() != 2 or support_ids.shape[0] != num_rows:
        raise ValueError(f"support_ids must be [{num_rows}, K], got {tuple(support_ids.shape)}")
    if support_ids.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(support_ids))
    if lo < -1 or hi >= vocab_size:
        raise ValueError(
            f"support_ids must lie in [-1, {vocab_size - 1}] (V = {vocab_size}, -1 = padding), "
            f"got values in [{lo}, {hi}]"
        )


def dedupe_support(support_ids: torch.Tensor) -> torch.Tensor:
    """[N, K] int64 -> [N, K] int64 with the same ids in the same slots, except that a
    repeat of an id already present earlier in its row becomes -1 (padding). No host sync.
    Slot order is kept, so values aligned with the slots (teacher log-probs) stay aligned."""
    ids = support_ids.to(torch.int64)
    if ids.shape[-1] < 2:
        return ids
    s, order = ids.sort(dim=-1, stable=True)  # equal ids keep their slot order
    rep = torch.zeros_like(s, dtype=torch.bool)
    rep[:, 1:] = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    rep = torch.zeros_like(rep).scatter_(-1, order, rep)  # back to slot order
    return torch.where(rep, -1, ids)


def _spread(leftover_mass: torch.Tensor, n_returned: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """log q for each unreturned id: log(max(ℓ, floor)) − log(V − n_R)."""
    n_out = (vocab_size - n_returned).clamp_min(1.0)
    return leftover_mass.clamp_min(FILL_MIN_MASS).log() - n_out.log()


def build_support(
    kind: SupportKind,
    k: int,
    student_logits: torch.Tensor | None = None,  # [N, V]; needed for "student" and "union"
    teacher_topk_ids: torch.Tensor | None = None,  # [N, Kt] or [M, N, Kt]; "teacher", "union"
) -> torch.Tensor:
    """Support ids [N, K'] int64. "student": the student's top-k (K' = min(k, V)); "teacher":
    the teacher's returned ids (all teachers' for M > 1, deduplicated); "union": both, with
    duplicates removed and -1 padding at the end of each row. Ties in the student's top-k are
    broken by torch.topk (any tied id is as good for the formula)."""
    parts: list[torch.Tensor] = []
    if kind in ("student", "union"):
        if student_logits is None:
            raise ValueError(f"build_support({kind!r}) needs student_logits")
        kk = min(k, student_logits.shape[-1])
        parts.append(student_logits.detach().topk(kk, dim=-1, sorted=False).indices)
    if kind in ("teacher", "union"):
        if teacher_topk_ids is None:
            raise ValueError(f"build_support({kind!r}) needs teacher_topk_ids")
        t = teacher_topk_ids.to(torch.int64)
        parts.extend(t.unbind(0) if t.dim() == 3 else [t])
    if not parts:
        raise ValueError(f"unknown support kind {kind!r}")
    ids = torch.cat(parts, dim=-1).to(torch.int64)
    if kind == "student":
        return ids
    return _dedupe_rows(ids)


def _dedupe_rows(ids: torch.Tensor) -> torch.Tensor:
    """Unique ids per row of [N, K], -1 padding moved to the end; width kept at K."""
    big = torch.iinfo(torch.int64).max
    s, _ = torch.where(ids >= 0, ids, big).sort(dim=-1)
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[:, 1:] = s[:, 1:] == s[:, :-1]
    s, _ = torch.where(dup, big, s).sort(dim=-1)
    return torch.where(s == big, -1, s)


def _lookup(
    ids: torch.Tensor, table_ids: torch.Tensor, table_vals: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For ids [N, K], the value at the same id in table_ids/table_vals [N, Kt] (sort +
    searchsorted, O(N K log Kt)); returns (values [N, K] fp32, found [N, K] bool)."""
    big = torch.iinfo(torch.int64).max
    tid = torch.where(table_ids >= 0, table_ids.to(torch.int64), big)
    tid, order = tid.sort(dim=-1)
    tval = table_vals.to(torch.float32).gather(-1, order)
    pos = torch.searchsorted(tid, ids.contiguous()).clamp_max(tid.shape[-1] - 1)
    found = (tid.gather(-1, pos) == ids) & (ids >= 0)
    return torch.where(found, tval.gather(-1, pos), 0.0), found


def teacher_logprobs_on_support(
    support_ids: torch.Tensor,  # [N, K] int64, -1 = padding
    vocab_size: int,
    teacher_topk_ids: torch.Tensor,  # [N, Kt]
    teacher_topk_logprobs: torch.Tensor,  # [N, Kt]
    teacher_leftover_logmass: torch.Tensor | None = None,  # [N] log(1 − Σ_topK q)
    query_ids: torch.Tensor | None = None,  # [N, Kq], -1 = padding
    query_logprobs: torch.Tensor | None = None,  # [N, Kq]
) -> torch.Tensor:
    """One teacher's log q on the support, [N, K] fp32, filled by the module's fill rule
    (0 on padding). Stack the result of several teachers along dim 0 for topk_kl."""
    vals, found = _lookup(support_ids, teacher_topk_ids, teacher_topk_logprobs)
    n_r = (teacher_topk_ids >= 0).sum(-1).to(torch.float32)  # [N]
    extra_mass = torch.zeros_like(n_r)
    if query_ids is not None:
        if query_logprobs is None:
            raise ValueError("query_ids given without query_logprobs")
        qv, qf = _lookup(support_ids, query_ids, query_logprobs)
        vals = torch.where(found, vals, qv)
        found = found | qf
        # Query ids outside the top-K are "returned" too: count each distinct one once.
        qs, order = torch.where(query_ids >= 0, query_ids.to(torch.int64), -1).sort(dim=-1)
        qlp = query_logprobs.to(torch.float32).gather(-1, order)
        first = torch.ones_like(qs, dtype=torch.bool)
        first[:, 1:] = qs[:, 1:] != qs[:, :-1]
        _, in_topk = _lookup(qs, teacher_topk_ids, teacher_topk_logprobs)
        extra = (qs >= 0) & first & ~in_topk
        n_r = n_r + extra.sum(-1)
        extra_mass = torch.where(extra, qlp.exp(), 0.0).sum(-1)
    valid = support_ids >= 0
    missing = valid & ~found
    if teacher_leftover_logmass is None:
        if bool(missing.any()):  # host sync, only on this helper path
            raise ValueError("support ids the teacher did not return need teacher_leftover_logmass")
        return torch.where(valid, vals, 0.0)
    leftover = teacher_leftover_logmass.to(torch.float32).exp() - extra_mass
    fill = _spread(leftover, n_r, vocab_size)
    return torch.where(missing, fill.unsqueeze(-1), torch.where(valid, vals, 0.0))


def log_uniform_fill(leftover_mass: float, vocab_size: int, n_returned: int) -> float:
    """Scalar form of the fill rule, for documentation and tests."""
    return math.log(max(leftover_mass, FILL_MIN_MASS)) - math.log(max(vocab_size - n_returned, 1))
