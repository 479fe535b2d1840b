"""Top-K Dense-gradient kernel: the KL and its logit gradient on a support S of K ids per row.

The maths (MATH.md § Top-K Dense gradient). One row: z ∈ R^V, p = softmax(z) over the whole
vocabulary, S the support (ids, -1 = padding, no repeats: see topk_support.dedupe_support),
teachers m with weights w_m, W = Σ_m w_m, lq̄_i = Σ_m w_m log q_m,i for i ∈ S (filled by the
rule in topk_support.py), and

    P_S  = Σ_{i∈S} p_i,        kl_S = Σ_{i∈S} p_i (W log p_i − lq̄_i)      (not renormalised)

Modes, named plainly:

- "sparse" (default, the paper's): grad_i = p_i (W log p_i − lq̄_i − kl_S) on S, 0 elsewhere.
  Biased; exact when P_S = 1. The logit gradient of this term is K-sparse (an LM-head
  backward fed only this term would touch K rows of the weight; in training the Sparse
  term's e_y − p is dense, so the sum is not).
- "exact": the true gradient of kl_S, which is dense because p is normalised over V:
      ∂kl_S/∂z_j = p_j (1[j∈S] (W log p_j − lq̄_j + W) − (kl_S + W P_S)).
- "renorm": p̃ = softmax(z_S), q̃_m = q_m,S / Σ_S q_m (renormalised on S), loss
  Σ_m w_m KL(p̃ ‖ q̃_m); its exact gradient is sparse: p̃_i (W log p̃_i − lq̄̃_i − kl̃) on S.
  It sums to zero over S, which does not keep P_S fixed: moving z within S changes
  log Σ_S e^z by Σ_S p̃_i dz_i ≠ 0 while the logits off S stay where they are.

Every mode also returns P_S and tail = (1 − P_S)(kl_S + W P_S) = Σ_{j∉S} p_j (kl_S + W P_S),
the size of the off-support gradient that "sparse" drops (on S, "exact" − "sparse" =
W p_i (1 − P_S), which vanishes with the tail). kl[n] is scaled by the row weight ρ_n.

Forward: one read of z per row (an online logsumexp over V, split over several programs per
row when N is too small to fill the GPU, then merged on the host), a gather of z at S and
K-vector maths. It writes per row the outputs and the [N, K] fp32 gradient at the support
slots (ρ × the mode's value; for "exact" the on-support value). Backward:

- "sparse"/"renorm": the gradient is K-sparse. support_grad() returns it as values [N, K]
  at the support ids without touching [N, V]; through autograd the caller gets either a
  sparse COO [N, V] tensor (sparse_grad=True: N·K entries) or, by default, a dense [N, V]
  (zeros plus a scatter of the N·K values, for callers that need a strided gradient).
- "exact": recomputed, one program per (row, V chunk): −go·ρ(kl_S + W P_S)·p_j everywhere
  (one read of z, one write), then a second launch overwrites the K support slots. No
  [N, V] buffer lives between forward and backward, and grad_output is folded in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainer.ops.dense_kl_kernel import (
    MAX_BLOCK_V,
    _block_v,
    _configs,
    _num_warps,
    merge_logsumexp,
    num_v_splits,
    row_weights_f32,
    split_len,
    teacher_weights_f32,
)
from trainer.ops.topk_support import TopKKLResult, TopKMode, check_support_ids, dedupe_support

_MODE_ID = {"sparse": 0, "exact": 1, "renorm": 2}
# Support sizes above this would spill registers on a GPU; a union of two top-256 fits.
MAX_BLOCK_K = 16384


@triton.jit
def _lse_partial_kernel(
    z_ptr,  # [N, V] student logits, last dim contiguous
    stride_zn,  # elements between rows
    rho_ptr,  # [N] fp32 row weights; only read when HAS_ROW_WEIGHTS (0: row not read)
    mx_ptr,  # [N, SPLITS] fp32 out: max of z over the split
    s_ptr,  # [N, SPLITS] fp32 out: Σ e^{z − mx} over the split
    V,
    SPLIT_LEN,  # columns per split, a multiple of MAX_BLOCK_V
    SPLITS: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    rho = 1.0
    if HAS_ROW_WEIGHTS:
        rho = tl.load(rho_ptr + n)
    mx = sp.to(tl.float32) * 0.0 - 1.0e30  # an fp32 scalar, finite (see dense_kl_kernel.py)
    s = mx * 0.0
    if rho != 0.0:
        lo = sp * SPLIT_LEN
        for start in range(lo, lo + SPLIT_LEN, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            z = tl.load(z_ptr + n * stride_zn + offs, mask=offs < V, other=float("-inf"))
            z = z.to(tl.float32)
            mx_new = tl.maximum(mx, tl.max(z, axis=0))
            s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(z - mx_new), axis=0)
            mx = mx_new
    tl.store(mx_ptr + n * SPLITS + sp, mx)
    tl.store(s_ptr + n * SPLITS + sp, s)


@triton.jit
def _topk_kl_kernel(
    z_ptr,  # [N, V] student logits (bf16/fp16/fp32), last dim contiguous
    stride_zn,  # elements between student rows
    ids_ptr,  # [N, K] int64 support ids in [-1, V), -1 = padding, unique per row, contiguous
    lq_ptr,  # [M, N, K] fp32 teacher log-probs at the support (filled), contiguous
    w_ptr,  # [M] fp32 teacher weights w_m
    rho_ptr,  # [N] fp32 row weights ρ_n; only read when HAS_ROW_WEIGHTS
    lse_ptr,  # [N] fp32 student logsumexp: read if LSE_GIVEN, else written here
    kl_ptr,  # [N] fp32 out: ρ_n × the mode's loss
    mass_ptr,  # [N] fp32 out: P_S (0 on masked rows)
    tail_ptr,  # [N] fp32 out: (1 − P_S)(kl_S + W P_S) (0 on masked rows)
    coef_ptr,  # [N] fp32 out ("exact"): ρ_n (kl_S + W P_S), the off-support coefficient
    gs_ptr,  # [N, K] fp32 out: ρ_n × gradient at the support slots (0 on padding)
    N,
    V,
    K,
    M,
    MODE: tl.constexpr,  # 0 sparse, 1 exact, 2 renorm
    HAS_ROW_WEIGHTS: tl.constexpr,
    LSE_GIVEN: tl.constexpr,  # the logsumexp came from _lse_partial_kernel (V split)
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # int64: n * V exceeds 2^31 at N = 8192, V = 151,936
    z_row = z_ptr + n * stride_zn
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    rho = 1.0
    if HAS_ROW_WEIGHTS:
        rho = tl.load(rho_ptr + n)
    W = 0.0
    for m in range(0, M):
        W += tl.load(w_ptr + m)

    if rho != 0.0:
        if LSE_GIVEN:
            lse = tl.load(lse_ptr + n)
        else:  # full-vocabulary logsumexp, online over V
            mx = W * 0.0 - 1.0e30  # finite, as in dense_kl_kernel.py
            s = W * 0.0
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                mx_new = tl.maximum(mx, tl.max(z, axis=0))
                s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(z - mx_new), axis=0)
                mx = mx_new
            lse = mx + tl.log(s)
            tl.store(lse_ptr + n, lse)

        # Gather z at the support; ids are range-checked on the host, masked here as well.
        ids = tl.load(ids_ptr + n * K + k, mask=kmask, other=-1)
        valid = kmask & (ids >= 0) & (ids < V)
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
        elif MODE == 1:
            kl = kl_s
            on_s = tl.where(p > 0.0, W * log_p + W - lq_raw - kl_s - W * p_s, 0.0)
            g_s = rho * p * on_s
            tl.store(coef_ptr + n, rho * (kl_s + W * p_s))
        else:
            kl = kl_s
            g_s = rho * p * tl.where(p > 0.0, W * log_p - lq_raw - kl_s, 0.0)
        tl.store(kl_ptr + n, rho * kl)
        tl.store(gs_ptr + n * K + k, g_s, mask=kmask)
    else:
        # Masked row: never read it (it may be padding garbage); exact zeros out.
        tl.store(kl_ptr + n, 0.0)
        tl.store(mass_ptr + n, 0.0)
        tl.store(tail_ptr + n, 0.0)
        tl.store(lse_ptr + n, 0.0)
        if MODE == 1:
            tl.store(coef_ptr + n, 0.0)
        tl.store(gs_ptr + n * K + k, tl.zeros([BLOCK_K], dtype=tl.float32), mask=kmask)


@triton.jit
def _exact_dense_bwd_kernel(
    z_ptr,  # [N, V] student logits, last dim contiguous
    stride_zn,  # elements between rows
    lse_ptr,  # [N] fp32 student logsumexp
    coef_ptr,  # [N] fp32 grad_output ρ (kl_S + W P_S) (0: row not read)
    g_ptr,  # [N, V] out, student dtype: −coef · p (the off-support formula, everywhere)
    stride_gn,  # elements between gradient rows
    V,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    coef = tl.load(coef_ptr + n)
    g = tl.zeros([BLOCK_V], dtype=tl.float32)
    if coef != 0.0:
        z = tl.load(z_ptr + n * stride_zn + offs, mask=mask, other=float("-inf")).to(tl.float32)
        g = -coef * tl.exp(z - tl.load(lse_ptr + n))
    tl.store(g_ptr + n * stride_gn + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_support_kernel(
    g_ptr,  # [N, V] gradient, student dtype: the support slots are overwritten
    stride_gn,  # elements between rows
    ids_ptr,  # [N, K] int64 support ids, -1 = padding, unique per row
    gs_ptr,  # [N, K] fp32 values at the support slots (× ρ)
    go_ptr,  # [N] fp32 grad_output
    V,
    K,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    ids = tl.load(ids_ptr + n * K + k, mask=k < K, other=-1)
    valid = (k < K) & (ids >= 0) & (ids < V)
    g = tl.load(go_ptr + n) * tl.load(gs_ptr + n * K + k, mask=valid, other=0.0)
    tl.store(g_ptr + n * stride_gn + ids, g.to(g_ptr.dtype.element_ty), mask=valid)


# CUDA: BLOCK_V / num_warps per shape (the support size and mode change register use).
_topk_fwd_tuned = triton.autotune(
    configs=_configs((2048, 4096, 8192), (4, 8)), key=["V", "K", "M", "MODE", "LSE_GIVEN"]
)(_topk_kl_kernel)
_exact_bwd_tuned = triton.autotune(configs=_configs((1024, 2048, 4096), (4, 8)), key=["V"])(
    _exact_dense_bwd_kernel
)


# ---------------------------------------------------------------------------------------
# Launchers


def prepare_support(support_ids: torch.Tensor, N: int, V: int) -> torch.Tensor:
    """Range-check (one host sync) and deduplicate the support: [N, K] int64, contiguous."""
    check_support_ids(support_ids, N, V)
    return dedupe_support(support_ids).contiguous()


def topk_kl_forward(
    student_logits: torch.Tensor,  # [N, V]
    support_ids: torch.Tensor,  # [N, K] int64, already through prepare_support
    teacher_lq: torch.Tensor,  # [M, N, K] or [N, K] filled log-probs
    teacher_weights: torch.Tensor | None,  # [M]
    row_weights: torch.Tensor | None,  # [N]
    mode: TopKMode,
    block_v: int | None = None,
    v_splits: int | None = None,
) -> tuple[TopKKLResult, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the kernels; returns (per-row outputs, support gradient [N, K] fp32 (× ρ),
    student lse [N] fp32, off-support coefficient [N] fp32 ("exact"; zeros otherwise))."""
    if mode not in _MODE_ID:
        raise ValueError(f"mode must be 'sparse', 'exact' or 'renorm', got {mode!r}")
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    N, V = z.shape
    dev = z.device
    ids = support_ids.to(device=dev, dtype=torch.int64).contiguous()
    if ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"support_ids must be [{N}, K], got {tuple(ids.shape)}")
    K = ids.shape[1]
    lq = teacher_lq.unsqueeze(0) if teacher_lq.dim() == 2 else teacher_lq
    lq = lq.detach().to(device=dev, dtype=torch.float32).contiguous()
    if lq.dim() != 3 or lq.shape[1:] != (N, K):
        raise ValueError(
            f"teacher_logprobs_at_support must be [M, {N}, {K}] or [{N}, {K}], "
            f"got {tuple(teacher_lq.shape)}"
        )
    M = lq.shape[0]
    w = teacher_weights_f32(teacher_weights, M, dev)
    rho = row_weights_f32(row_weights, N, dev)
    block_k = triton.next_power_of_2(max(K, 1))
    if block_k > MAX_BLOCK_K:
        raise ValueError(f"support size K = {K} exceeds {MAX_BLOCK_K}")
    tuned = z.is_cuda and block_v is None
    block = MAX_BLOCK_V if tuned else _block_v(V, block_v)

    kl = torch.empty(N, dtype=torch.float32, device=dev)
    mass, tail, lse = torch.empty_like(kl), torch.empty_like(kl), torch.empty_like(kl)
    coef = torch.zeros_like(kl)
    gs = torch.empty((N, K), dtype=torch.float32, device=dev)
    splits = num_v_splits(N, V, dev, v_splits)
    if splits > 1:  # too few rows to fill the GPU: the logsumexp pass is split over V
        seg = split_len(V, splits)
        mx = torch.empty((N, splits), dtype=torch.float32, device=dev)
        s = torch.empty_like(mx)
        sblock = min(block, seg)
        _lse_partial_kernel[(N, splits)](
            z, z.stride(0), rho if rho is not None else w, mx, s, V, seg,
            SPLITS=splits, HAS_ROW_WEIGHTS=rho is not None, BLOCK_V=sblock,
            num_warps=_num_warps(sblock),
        )  # fmt: skip
        top, r = merge_logsumexp(mx, s)
        lse = top + (r * s).sum(-1).log()
    args = (
        z, z.stride(0), ids, lq, w, rho if rho is not None else kl, lse, kl, mass, tail, coef,
        gs, N, V, K, M,
    )  # fmt: skip
    meta = dict(MODE=_MODE_ID[mode], HAS_ROW_WEIGHTS=rho is not None, LSE_GIVEN=splits > 1)
    if tuned:
        _topk_fwd_tuned[(N,)](*args, **meta, BLOCK_K=block_k)
    else:
        _topk_kl_kernel[(N,)](
            *args, **meta, BLOCK_V=block, BLOCK_K=block_k, num_warps=_num_warps(block)
        )
    if splits > 1 and rho is not None:
        lse = torch.where(rho != 0, lse, 0.0)
    return TopKKLResult(kl, mass, tail), gs, lse, coef


def exact_backward(
    student_logits: torch.Tensor,  # [N, V]
    ids: torch.Tensor,  # [N, K] int64, prepared
    gs: torch.Tensor,  # [N, K] fp32 on-support gradient (× ρ)
    lse: torch.Tensor,  # [N] fp32
    coef: torch.Tensor,  # [N] fp32 ρ (kl_S + W P_S)
    grad_output: torch.Tensor,  # [N]
    block_v: int | None = None,
) -> torch.Tensor:
    """The dense "exact" gradient [N, V] (student dtype), recomputed from z and row stats."""
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    N, V = z.shape
    K = ids.shape[1]
    go = grad_output.to(device=z.device, dtype=torch.float32).expand(N).contiguous()
    g = torch.empty_like(z)
    args = (z, z.stride(0), lse, (go * coef).contiguous(), g, g.stride(0), V)
    if z.is_cuda and block_v is None:
        _exact_bwd_tuned[lambda meta: (N, triton.cdiv(V, meta["BLOCK_V"]))](*args)
    else:
        block = _block_v(V, block_v)
        _exact_dense_bwd_kernel[(N, triton.cdiv(V, block))](
            *args, BLOCK_V=block, num_warps=_num_warps(block)
        )
    # Same stream, so this runs after the dense write and overwrites the support slots.
    _store_support_kernel[(N,)](
        g, g.stride(0), ids, gs, go, V, K, BLOCK_K=triton.next_power_of_2(max(K, 1))
    )
    return g


def sparse_to_dense(
    ids: torch.Tensor, vals: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """[N, V] zeros with vals [N, K] at ids [N, K] (-1 = padding, which carries 0)."""
    out = torch.zeros(shape, dtype=dtype, device=vals.device)
    # Padding slots carry a zero value, so sending them to id 0 adds nothing.
    return out.scatter_add_(1, ids.clamp_min(0), vals.to(dtype))


def sparse_to_coo(
    ids: torch.Tensor, vals: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> torch.Tensor:
    """A sparse COO [N, V] tensor with the N·K values (padding slots dropped)."""
    ids, order = ids.sort(dim=-1)  # unique ids sorted within sorted rows: coalesced order
    vals = vals.gather(-1, order)
    keep = ids >= 0
    rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1).expand_as(ids)
    index = torch.stack([rows[keep], ids[keep]])
    return torch.sparse_coo_tensor(
        index, vals[keep].to(dtype), shape, is_coalesced=True, check_invariants=False
    )


class TopKKLFunction(torch.autograd.Function):
    """(kl, student_mass, tail) per row; only kl is differentiable. Saves the [N, K] support
    gradient, the ids and (for "exact") z and two [N] row statistics."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        support_ids: torch.Tensor,
        teacher_lq: torch.Tensor,
        teacher_weights: torch.Tensor | None,
        row_weights: torch.Tensor | None,
        mode: TopKMode,
        sparse_grad: bool,
        block_v: int | None,
        v_splits: int | None,
    ):
        res, gs, lse, coef = topk_kl_forward(
            student_logits,
            support_ids,
            teacher_lq,
            teacher_weights,
            row_weights,
            mode,
            block_v,
            v_splits,
        )
        ctx.mode, ctx.sparse_grad, ctx.block_v = mode, sparse_grad, block_v
        ctx.shape, ctx.dtype = student_logits.shape, student_logits.dtype
        if mode == "exact":
            ctx.save_for_backward(support_ids, gs, student_logits, lse, coef)
        else:
            ctx.save_for_backward(support_ids, gs)
        ctx.mark_non_differentiable(res.student_mass, res.tail)
        return res.kl, res.student_mass, res.tail

    @staticmethod
    def backward(ctx, grad_kl: torch.Tensor, _grad_mass, _grad_tail):
        nones = (None,) * 8
        if ctx.mode == "exact":
            ids, gs, z, lse, coef = ctx.saved_tensors
            return (exact_backward(z, ids, gs, lse, coef, grad_kl, ctx.block_v), *nones)
        ids, gs = ctx.saved_tensors
        vals = gs * grad_kl.to(torch.float32).unsqueeze(-1)  # fp32 multiply, one rounding
        to_grad = sparse_to_coo if ctx.sparse_grad else sparse_to_dense
        return (to_grad(ids, vals, ctx.shape, ctx.dtype), *nones)


def topk_kl_triton(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_lq: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    mode: TopKMode = "sparse",
    *,
    sparse_grad: bool = False,
    block_v: int | None = None,
    v_splits: int | None = None,
    support_prepared: bool = False,
) -> TopKKLResult:
    """Triton top-K KL. student_logits [N, V]; support_ids [N, K] int (-1 = padding; ids
    outside [-1, V) raise, repeats within a row count once); teacher_lq [M, N, K] or [N, K]
    filled log-probs; teacher_weights [M] (default 1/M); row_weights [N]. Returns
    TopKKLResult of [N] fp32 tensors. sparse_grad=True ("sparse"/"renorm"): the logits get a
    sparse COO gradient with N·K entries instead of a dense [N, V] one.
    support_prepared: the caller already ran prepare_support (skips its host sync)."""
    if sparse_grad and mode == "exact":
        raise ValueError("sparse_grad=True needs mode 'sparse' or 'renorm': 'exact' is dense")
    N, V = student_logits.shape
    ids = support_ids if support_prepared else prepare_support(support_ids, N, V)
    kl, mass, tail = TopKKLFunction.apply(
        student_logits,
        ids,
        teacher_lq,
        teacher_weights,
        row_weights,
        mode,
        sparse_grad,
        block_v,
        v_splits,
    )
    return TopKKLResult(kl, mass, tail)


def topk_kl_support_grad_triton(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_lq: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    mode: TopKMode = "sparse",
    grad_output: torch.Tensor | None = None,
    *,
    block_v: int | None = None,
    v_splits: int | None = None,
    support_prepared: bool = False,
) -> tuple[TopKKLResult, torch.Tensor, torch.Tensor]:
    """No autograd: (outputs, support ids [N, K] as used (deduplicated), gradient values
    [N, K] fp32 at those ids: grad_output[n] ρ_n ∂kl/∂z at each support slot, 0 on
    padding). For a caller that applies the gradient itself (an LM-head backward:
    dh[n] = Σ_k g[n, k] W[ids[n, k]])."""
    if mode == "exact":
        raise ValueError("the 'exact' gradient is dense: use topk_kl and autograd instead")
    N, V = student_logits.shape
    ids = support_ids if support_prepared else prepare_support(support_ids, N, V)
    res, gs, _lse, _coef = topk_kl_forward(
        student_logits.detach(), ids, teacher_lq, teacher_weights, row_weights, mode, block_v,
        v_splits,
    )  # fmt: skip
    if grad_output is not None:
        gs = gs * grad_output.to(device=gs.device, dtype=torch.float32).reshape(-1, 1)
    return res, ids, gs
