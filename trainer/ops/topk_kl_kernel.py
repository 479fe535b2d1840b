"""Top-K Dense-gradient kernel: the KL and its logit gradient on a support S of K ids per row.

The maths (MATH.md § Top-K Dense gradient). One row: z ∈ R^V, p = softmax(z) over the whole
vocabulary, S the support (ids, -1 = padding), teachers m with weights w_m, W = Σ_m w_m,
lq̄_i = Σ_m w_m log q_m,i for i ∈ S (filled by the rule in topk_support.py), and

    P_S  = Σ_{i∈S} p_i,        kl_S = Σ_{i∈S} p_i (W log p_i − lq̄_i)      (not renormalised)

Modes, named plainly:

- "sparse" (default, the paper's): grad_i = p_i (W log p_i − lq̄_i − kl_S) on S, 0 elsewhere.
  Biased; exact when P_S = 1. K-sparse, so the LM-head backward touches K rows.
- "exact": the true gradient of kl_S, which is dense because p is normalised over V:
      ∂kl_S/∂z_j = p_j (1[j∈S] (W log p_j − lq̄_j + W) − (kl_S + W P_S)).
- "renorm": p̃ = softmax(z_S), q̃_m = q_m,S / Σ_S q_m (renormalised on S), loss
  Σ_m w_m KL(p̃ ‖ q̃_m); its exact gradient is sparse: p̃_i (W log p̃_i − lq̄̃_i − kl̃) on S.

Every mode also returns P_S and tail = (1 − P_S)(kl_S + W P_S) = Σ_{j∉S} p_j (kl_S + W P_S),
the size of the off-support gradient that "sparse" drops (on S, "exact" − "sparse" =
W p_i (1 − P_S), which vanishes with the tail). kl[n] is scaled by the row weight ρ_n.

Kernel: one program per row. One pass over V for the logsumexp (the only full read of the
logits in "sparse"/"renorm"), then a gather of z at S and K-vector maths. "sparse"/"renorm"
write the gradient as [N, K] fp32 and the backward scatters it into the [N, V] logits
gradient; "exact" writes the [N, V] gradient (student dtype) in a second pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.ops.dense_kl_kernel import (
    _block_v,
    _num_warps,
    default_teacher_weights,
    scale_rows_,
)
from trainer.ops.topk_support import TopKKLResult, TopKMode

_MODE_ID = {"sparse": 0, "exact": 1, "renorm": 2}
# Support sizes above this would spill registers on a GPU; a union of two top-256 fits.
MAX_BLOCK_K = 16384


@triton.jit
def _topk_kl_kernel(
    z_ptr,  # [N, V] student logits (bf16/fp16/fp32), last dim contiguous
    stride_zn,  # elements between student rows
    ids_ptr,  # [N, K] int64 support ids, -1 = padding, contiguous
    lq_ptr,  # [M, N, K] fp32 teacher log-probs at the support (filled), contiguous
    w_ptr,  # [M] fp32 teacher weights w_m
    rho_ptr,  # [N] fp32 row weights ρ_n; only read when HAS_ROW_WEIGHTS
    kl_ptr,  # [N] fp32 out: ρ_n × the mode's loss
    mass_ptr,  # [N] fp32 out: P_S (0 on masked rows)
    tail_ptr,  # [N] fp32 out: (1 − P_S)(kl_S + W P_S) (0 on masked rows)
    gs_ptr,  # [N, K] fp32 out ("sparse"/"renorm"): ρ_n × gradient at the support slots
    g_ptr,  # [N, V] out, student dtype ("exact"): ρ_n × the dense gradient
    stride_gn,  # elements between rows of g
    N,
    V,
    K,
    M,
    MODE: tl.constexpr,  # 0 sparse, 1 exact, 2 renorm
    HAS_ROW_WEIGHTS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # int64: n * V exceeds 2^31 at N = 8192, V = 151,936
    z_row = z_ptr + n * stride_zn
    g_row = g_ptr + n * stride_gn
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    rho = 1.0
    if HAS_ROW_WEIGHTS:
        rho = tl.load(rho_ptr + n)
    W = 0.0
    for m in range(0, M):
        W += tl.load(w_ptr + m)

    if rho != 0.0:
        # Full-vocabulary logsumexp, online over V.
        mx = -1.0e30  # finite, as in dense_kl_kernel.py (no non-constexpr globals in @jit)
        s = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            mx_new = tl.maximum(mx, tl.max(z, axis=0))
            s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(z - mx_new), axis=0)
            mx = mx_new
        lse = mx + tl.log(s)

        # Gather z at the support.
        ids = tl.load(ids_ptr + n * K + k, mask=kmask, other=-1)
        valid = kmask & (ids >= 0)
        zs = tl.load(z_row + tl.where(valid, ids, 0), mask=valid, other=float("-inf"))
        zs = zs.to(tl.float32)
        log_p = zs - lse
        p = tl.where(valid, tl.exp(log_p), 0.0)

        # lq̄ (raw) and, for "renorm", lq̄ of the teachers renormalised on S.
        lq_raw = tl.zeros([BLOCK_K], dtype=tl.float32)
        lq_ren = tl.zeros([BLOCK_K], dtype=tl.float32)
        lq_m_ptr = lq_ptr + n * K
        for m in range(0, M):
            w = tl.load(w_ptr + m)
            lq = tl.load(lq_m_ptr + k, mask=valid, other=0.0)
            lq_raw += w * lq
            if MODE == 2:
                lq_masked = tl.where(valid, lq, float("-inf"))
                mq = tl.max(lq_masked, axis=0)
                lse_q = mq + tl.log(tl.sum(tl.exp(lq_masked - mq), axis=0))
                lq_ren += w * (lq - lse_q)
            lq_m_ptr += N * K

        p_s = tl.sum(p, axis=0)
        kl_s = tl.sum(p * tl.where(p > 0.0, W * log_p - lq_raw, 0.0), axis=0)
        tl.store(mass_ptr + n, p_s)
        tl.store(tail_ptr + n, (1.0 - p_s) * (kl_s + W * p_s))

        if MODE == 2:
            zs_masked = tl.where(valid, zs, float("-inf"))
            ms = tl.max(zs_masked, axis=0)
            log_pt = zs - (ms + tl.log(tl.sum(tl.exp(zs_masked - ms), axis=0)))
            pt = tl.where(valid, tl.exp(log_pt), 0.0)
            kl = tl.sum(pt * tl.where(pt > 0.0, W * log_pt - lq_ren, 0.0), axis=0)
            g_s = rho * pt * tl.where(pt > 0.0, W * log_pt - lq_ren - kl, 0.0)
        else:
            kl = kl_s
            g_s = rho * p * tl.where(p > 0.0, W * log_p - lq_raw - kl_s, 0.0)
        tl.store(kl_ptr + n, rho * kl)

        if COMPUTE_GRAD:
            if MODE == 1:
                # Off-support part everywhere, then overwrite the support slots.
                coef = rho * (kl_s + W * p_s)
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    mask = offs < V
                    z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                    g = -tl.exp(z - lse) * coef
                    tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
                # Threads of this program wrote some support slots above: order the writes.
                tl.debug_barrier()
                on_s = tl.where(p > 0.0, W * log_p + W - lq_raw - kl_s - W * p_s, 0.0)
                g_on = rho * p * on_s
                tl.store(g_row + ids, g_on.to(g_ptr.dtype.element_ty), mask=valid)
            else:
                tl.store(gs_ptr + n * K + k, g_s, mask=kmask)
    else:
        # Masked row: never read it (it may be padding garbage); exact zeros out.
        tl.store(kl_ptr + n, 0.0)
        tl.store(mass_ptr + n, 0.0)
        tl.store(tail_ptr + n, 0.0)
        if COMPUTE_GRAD:
            if MODE == 1:
                for start in range(0, V, BLOCK_V):
                    offs = start + tl.arange(0, BLOCK_V)
                    zeros = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
                    tl.store(g_row + offs, zeros, mask=offs < V)
            else:
                tl.store(gs_ptr + n * K + k, tl.zeros([BLOCK_K], dtype=tl.float32), mask=kmask)


# ---------------------------------------------------------------------------------------
# Launcher


def topk_kl_forward(
    student_logits: torch.Tensor,  # [N, V]
    support_ids: torch.Tensor,  # [N, K] int64
    teacher_lq: torch.Tensor,  # [M, N, K] or [N, K] filled log-probs
    teacher_weights: torch.Tensor | None,  # [M]
    row_weights: torch.Tensor | None,  # [N]
    mode: TopKMode,
    compute_grad: bool,
    block_v: int | None = None,
) -> tuple[TopKKLResult, torch.Tensor | None]:
    """Launch the kernel; returns the per-row outputs and the saved gradient: [N, K] fp32 for
    "sparse"/"renorm", [N, V] in the student dtype for "exact", or None."""
    if mode not in _MODE_ID:
        raise ValueError(f"mode must be 'sparse', 'exact' or 'renorm', got {mode!r}")
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    N, V = z.shape
    ids = support_ids.to(device=z.device, dtype=torch.int64).contiguous()
    if ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"support_ids must be [{N}, K], got {tuple(ids.shape)}")
    K = ids.shape[1]
    lq = teacher_lq.unsqueeze(0) if teacher_lq.dim() == 2 else teacher_lq
    lq = lq.detach().to(device=z.device, dtype=torch.float32).contiguous()
    if lq.shape[1:] != (N, K):
        raise ValueError(f"teacher log-probs must be [M, {N}, {K}], got {tuple(lq.shape)}")
    M = lq.shape[0]
    w = default_teacher_weights(M, z.device) if teacher_weights is None else teacher_weights
    w = w.detach().to(device=z.device, dtype=torch.float32).contiguous().reshape(M)
    rho = None
    if row_weights is not None:
        rho = row_weights.detach().to(device=z.device, dtype=torch.float32).contiguous()
    block_k = triton.next_power_of_2(max(K, 1))
    if block_k > MAX_BLOCK_K:
        raise ValueError(f"support size K = {K} exceeds {MAX_BLOCK_K}")
    block = _block_v(V, block_v)

    kl = torch.empty(N, dtype=torch.float32, device=z.device)
    mass = torch.empty_like(kl)
    tail = torch.empty_like(kl)
    gs = g = None
    if compute_grad:
        if mode == "exact":
            g = torch.empty_like(z)
        else:
            gs = torch.empty((N, K), dtype=torch.float32, device=z.device)
    _topk_kl_kernel[(N,)](
        z,
        z.stride(0),
        ids,
        lq,
        w,
        rho if rho is not None else kl,
        kl,
        mass,
        tail,
        gs if gs is not None else kl,
        g if g is not None else z,
        g.stride(0) if g is not None else 0,
        N,
        V,
        K,
        M,
        MODE=_MODE_ID[mode],
        HAS_ROW_WEIGHTS=rho is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block,
        BLOCK_K=block_k,
        num_warps=_num_warps(block),
    )
    return TopKKLResult(kl, mass, tail), (g if mode == "exact" else gs)


class TopKKLFunction(torch.autograd.Function):
    """(kl, student_mass, tail) per row; only kl is differentiable. Saves the [N, K] support
    gradient and the ids ("sparse"/"renorm") or the [N, V] gradient ("exact")."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        support_ids: torch.Tensor,
        teacher_lq: torch.Tensor,
        teacher_weights: torch.Tensor | None,
        row_weights: torch.Tensor | None,
        mode: TopKMode,
        compute_grad: bool,
        block_v: int | None,
    ):
        res, grad = topk_kl_forward(
            student_logits,
            support_ids,
            teacher_lq,
            teacher_weights,
            row_weights,
            mode,
            compute_grad,
            block_v,
        )
        ctx.mode = mode
        ctx.grad = grad
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        if mode != "exact":
            ctx.save_for_backward(support_ids)
        ctx.mark_non_differentiable(res.student_mass, res.tail)
        return res.kl, res.student_mass, res.tail

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor, _grad_mass, _grad_tail):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "topk_kl: backward called twice, or the forward ran without grad enabled"
            )
        nones = (None,) * 7
        if ctx.mode == "exact":
            ctx.grad = None  # consumed in place
            return (scale_rows_(grad, grad_kl), *nones)
        (ids,) = ctx.saved_tensors
        vals = (grad * grad_kl.to(torch.float32).unsqueeze(-1)).to(ctx.dtype)
        out = torch.zeros(ctx.shape, dtype=ctx.dtype, device=grad.device)
        # Padding slots (-1) carry a zero gradient, so sending them to id 0 adds nothing.
        out.scatter_add_(1, ids.clamp_min(0), vals)
        return (out, *nones)


def topk_kl_triton(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_lq: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    mode: TopKMode = "sparse",
    *,
    block_v: int | None = None,
) -> TopKKLResult:
    """Triton top-K KL. student_logits [N, V]; support_ids [N, K] int64 (-1 = padding);
    teacher_lq [M, N, K] or [N, K] filled log-probs; teacher_weights [M] (default 1/M);
    row_weights [N]. Returns TopKKLResult of [N] fp32 tensors."""
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    kl, mass, tail = TopKKLFunction.apply(
        student_logits,
        support_ids,
        teacher_lq,
        teacher_weights,
        row_weights,
        mode,
        compute_grad,
        block_v,
    )
    return TopKKLResult(kl, mass, tail)
