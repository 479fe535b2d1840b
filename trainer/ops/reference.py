"""Pure-torch references for the Dense kernels: the float64 test oracle and the CPU fallback.

Same maths and signatures as dense_kl_kernel.py / topk_kl_kernel.py (see their docstrings
and MATH.md § Logit-level Dense gradient, § Top-K Dense gradient), written with plain
autograd so that the gradient is obtained independently of the kernels' hand-written
formulas:

- dense: autograd of Σ_m w_m Σ_v p (log p − log q_m) — an exact gradient.
- top-K "exact": autograd of kl_S = Σ_{i∈S} p_i (W log p_i − lq̄_i) with p the full softmax.
- top-K "renorm": autograd of the KL between softmax(z_S) and q renormalised on S.
- top-K "sparse": not the gradient of any simple loss (MATH.md), so it is built as a
  surrogate whose value is kl_S and whose gradient is p_S (W log p_S − lq̄_S − kl_S) on S.

Computation runs in float64 for float64 inputs and float32 otherwise; it materialises
[N, V] intermediates, which is fine for a fallback and an oracle, not for training at scale.
Rows with weight 0 are replaced by zeros before any maths, so padding garbage (NaN) in a
masked row yields kl = 0 and a zero gradient, like the kernels. Shapes are checked (a
teacher is never broadcast), support ids must lie in [-1, V) and repeats within a row are
dropped (topk_support.dedupe_support), as in the kernels.
"""

from __future__ import annotations

import torch

from trainer.ops.topk_support import TopKKLResult, TopKMode, check_support_ids, dedupe_support

# A finite "minus infinity" for masked support slots: keeps 0·log 0 terms out of autograd.
_NEG_BIG = -1.0e30


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _weights(
    teacher_weights: torch.Tensor | None, M: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if teacher_weights is None:
        return torch.full((M,), 1.0 / M, dtype=dtype, device=device)
    if teacher_weights.numel() != M:
        raise ValueError(
            f"teacher_weights must be [{M}] (one per teacher), got {tuple(teacher_weights.shape)}"
        )
    return teacher_weights.detach().to(device=device, dtype=dtype).reshape(M)


def _row_mask(
    row_weights: torch.Tensor | None, N: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    if row_weights is None:
        return torch.ones(N, dtype=dtype, device=device)
    if row_weights.dim() != 1 or row_weights.shape[0] != N:
        raise ValueError(f"row_weights must be [{N}] (one per row), got {tuple(row_weights.shape)}")
    return row_weights.detach().to(device=device, dtype=dtype)


def dense_kl_reference(
    student_logits: torch.Tensor,  # [N, V]
    teacher_logprobs: torch.Tensor,  # [M, N, V] or [N, V]; logits if teacher_are_logits
    teacher_weights: torch.Tensor | None = None,  # [M], default 1/M
    row_weights: torch.Tensor | None = None,  # [N], 0 masks a row
    teacher_are_logits: bool = False,
) -> torch.Tensor:
    """kl [N] (fp32, or fp64 for fp64 logits) = ρ_n Σ_m w_m KL(softmax(z_n) ‖ q_m,n)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    cdt = _compute_dtype(student_logits)
    N, V = student_logits.shape
    t = teacher_logprobs.detach()
    t = (t.unsqueeze(0) if t.dim() == 2 else t).to(cdt)
    if t.dim() != 3 or t.shape[1:] != (N, V):  # no broadcasting of a mis-shaped teacher
        raise ValueError(
            f"teacher must be [M, {N}, {V}] or [{N}, {V}], got {tuple(teacher_logprobs.shape)}"
        )
    M = t.shape[0]
    w = _weights(teacher_weights, M, t.device, cdt)
    rho = _row_mask(row_weights, N, t.device, cdt)
    keep = (rho != 0).unsqueeze(-1)  # [N, 1]
    z = torch.where(keep, student_logits.to(cdt), 0.0)
    t = torch.where(keep.unsqueeze(0), t, 0.0)
    if teacher_are_logits:
        t = t.log_softmax(-1)
    logp = z.log_softmax(-1)  # [N, V]
    p = logp.exp()
    # p·(log p − log q) with the 0·log 0 = 0 convention where p underflows to 0.
    diff = torch.where(p.unsqueeze(0) > 0, logp.unsqueeze(0) - t, 0.0)  # [M, N, V]
    kl_m = (p.unsqueeze(0) * diff).sum(-1)  # [M, N]
    kl = (w.unsqueeze(-1) * kl_m).sum(0)
    return (rho * kl).to(torch.float64 if cdt == torch.float64 else torch.float32)


def topk_kl_reference(
    student_logits: torch.Tensor,  # [N, V]
    support_ids: torch.Tensor,  # [N, K] int64, -1 = padding
    teacher_logprobs_at_support: torch.Tensor,  # [M, N, K] or [N, K], already filled
    teacher_weights: torch.Tensor | None = None,  # [M]
    row_weights: torch.Tensor | None = None,  # [N]
    mode: TopKMode = "sparse",
) -> TopKKLResult:
    """Reference top-K KL (see topk_kl_kernel.py for the maths of each mode)."""
    if mode not in ("sparse", "exact", "renorm"):
        raise ValueError(f"mode must be 'sparse', 'exact' or 'renorm', got {mode!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    cdt = _compute_dtype(student_logits)
    N, V = student_logits.shape
    check_support_ids(support_ids, N, V)
    support_ids = dedupe_support(support_ids.to(student_logits.device))  # S is a set
    K = support_ids.shape[1]
    lq = teacher_logprobs_at_support.detach()
    lq = (lq.unsqueeze(0) if lq.dim() == 2 else lq).to(cdt)
    if lq.dim() != 3 or lq.shape[1:] != (N, K):
        raise ValueError(
            f"teacher_logprobs_at_support must be [M, {N}, {K}] or [{N}, {K}], "
            f"got {tuple(teacher_logprobs_at_support.shape)}"
        )
    M = lq.shape[0]
    w = _weights(teacher_weights, M, lq.device, cdt)
    W = w.sum()
    rho = _row_mask(row_weights, N, lq.device, cdt)
    keep = (rho != 0).unsqueeze(-1)
    valid = (support_ids >= 0) & keep  # [N, K]
    ids = support_ids.clamp_min(0)
    lq = torch.where(valid.unsqueeze(0), lq, 0.0)

    z = torch.where(keep, student_logits.to(cdt), 0.0)
    logp_s = z.log_softmax(-1).gather(-1, ids)  # [N, K]
    p_s = torch.where(valid, logp_s.exp(), 0.0)
    lq_bar = (w.view(M, 1, 1) * lq).sum(0)  # [N, K]
    term = torch.where(valid, W * logp_s - lq_bar, 0.0)
    kl_s = (p_s * term).sum(-1)  # [N]
    mass = p_s.sum(-1)

    if mode == "exact":
        kl = kl_s
    elif mode == "sparse":
        g = (p_s * torch.where(valid, term - kl_s.unsqueeze(-1), 0.0)).detach()
        z_s = z.gather(-1, ids)
        kl = kl_s.detach() + (g * (z_s - z_s.detach())).sum(-1)
    else:  # renorm: softmax over z_S, teacher renormalised on S
        z_s = torch.where(valid, z.gather(-1, ids), _NEG_BIG)
        logpt = z_s.log_softmax(-1)
        pt = torch.where(valid, logpt.exp(), 0.0)
        lq_m = torch.where(valid.unsqueeze(0), lq, _NEG_BIG)
        lq_ren = lq_m - lq_m.logsumexp(-1, keepdim=True)
        lq_ren_bar = (w.view(M, 1, 1) * torch.where(valid.unsqueeze(0), lq_ren, 0.0)).sum(0)
        kl = (pt * torch.where(valid, W * logpt - lq_ren_bar, 0.0)).sum(-1)

    tail = ((1.0 - mass) * (kl_s + W * mass)).detach()
    out = torch.float64 if cdt == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=cdt, device=lq.device)
    return TopKKLResult(
        kl=(rho * kl).to(out),
        student_mass=torch.where(keep.squeeze(-1), mass.detach(), zero).to(out),
        tail=torch.where(keep.squeeze(-1), tail, zero).to(out),
    )
