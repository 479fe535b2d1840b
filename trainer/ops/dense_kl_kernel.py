"""Full-vocabulary Dense-gradient kernel: per-row reverse KL(p ‖ q) and its logit gradient.

The maths (MATH.md § Logit-level Dense gradient, § Schedules and extensions). For one row
(one token position) with student logits z ∈ R^V, p = softmax(z), teachers m = 1..M with
log-probs log q_m and weights w_m, W = Σ_m w_m and lq̄ = Σ_m w_m log q_m:

    KL_w      = Σ_m w_m KL(p ‖ q_m) = Σ_v p_v (W log p_v − lq̄_v)
    ∂KL_w/∂z  = Σ_m w_m p ⊙ (log p − log q_m − KL_m) = p ⊙ (W log p − lq̄ − KL_w)

so M teachers cost one extra read each but a single pass of the gradient. kl[n] = ρ_n KL_w(n)
for a row weight ρ_n (0 masks a row: never read, kl = 0, zero gradient).

Forward (one read of z and of the teachers). Online over V in BLOCK_V chunks, a running max
mx and

    S = Σ e^{z − mx},     A = Σ e^{z − mx} (W (z − mx) − t̄),     t̄ = Σ_m w_m t_m

rescaled when mx grows to mx': S ← e^{mx − mx'} S,  A ← e^{mx − mx'} (A + W (mx − mx') S).
With log-prob teachers t = log q and KL_w = A / S − W log S. With teacher *logits* t the
per-teacher logsumexp L_m is kept online in the same pass (running max and sum per teacher,
no separate kernel, no second read) and KL_w = A / S − W log S + Σ_m w_m L_m, because
lq̄ = t̄ − Σ_m w_m L_m is t̄ shifted by a per-row constant. Keeping z − mx ≤ 0 inside A avoids
the cancellation of Σ p z − lse at large logits. When N rows are too few to fill the GPU the
V axis is split over SPLITS programs per row, each writing its partial (mx, S, A, per-teacher
max and sum), merged on the host by the same rescaling rule.

The forward saves per row only lse = mx + log S, KL_w (and the teachers' L_m): O(N·M). The
backward recomputes the gradient from them, one program per (row, V chunk), with the
incoming grad_output[n] folded in:

    grad[n, v] = grad_output[n] ρ_n p_v (W log p_v − lq̄_v − KL_w)

computed in fp32 and rounded once to the student's dtype. Traffic, forward + backward:
two reads of z and of each teacher and one write of the gradient; no [N, V] buffer lives
between the two, and there is no separate scaling pass.

All row offsets are int64 (N·V exceeds 2^31 at V = 151,936); accumulation is fp32.
Launch parameters: triton.autotune over BLOCK_V and num_warps on CUDA (keyed on V and M);
under the Triton interpreter (CPU tests) a fixed configuration, since autotuning there
would time the interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Largest chunk of the vocabulary one program holds in registers at a time. V splits are
# multiples of it, so every BLOCK_V ≤ it (all powers of two) tiles a split exactly.
MAX_BLOCK_V = 8192
# Programs per streaming multiprocessor that saturate HBM on H100/H200-class GPUs.
_PROGRAMS_PER_SM = 4


@triton.jit
def _dense_kl_fwd_kernel(
    z_ptr,  # [N, V] student logits (bf16/fp16/fp32), last dim contiguous
    stride_zn,  # elements between student rows
    t_ptr,  # [M, N, V] teacher log-probs (or logits if TEACHER_IS_LOGITS), last dim contiguous
    stride_tm,  # elements between teachers
    stride_tn,  # elements between teacher rows
    w_ptr,  # [M] fp32 teacher weights w_m (not required to sum to 1)
    rho_ptr,  # [N] fp32 row weights ρ_n; only read when HAS_ROW_WEIGHTS
    mx_ptr,  # [N, SPLITS] fp32 out: running max of z over this split (log-space)
    s_ptr,  # [N, SPLITS] fp32 out: S = Σ e^{z − mx} over this split
    a_ptr,  # [N, SPLITS] fp32 out: A = Σ e^{z − mx}(W (z − mx) − t̄) over this split
    tmx_ptr,  # [M, N, SPLITS] fp32 out: per-teacher running max (TEACHER_IS_LOGITS only)
    ts_ptr,  # [M, N, SPLITS] fp32 out: per-teacher Σ e^{t − tmx} (TEACHER_IS_LOGITS only)
    N,
    V,
    M,
    SPLIT_LEN,  # columns per split, a multiple of MAX_BLOCK_V (V when SPLITS = 1)
    SPLITS: tl.constexpr,
    TEACHER_IS_LOGITS: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # next_pow2(M): lanes of the per-teacher logsumexp state
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # int64 so that n * stride never wraps
    sp = tl.program_id(1).to(tl.int64)
    out = n * SPLITS + sp
    rho = 1.0
    if HAS_ROW_WEIGHTS:
        rho = tl.load(rho_ptr + n)
    W = 0.0  # Σ_m w_m, summed here rather than on the host to avoid a device sync
    for m in range(0, M):
        W += tl.load(w_ptr + m)
    m_lane = tl.arange(0, BLOCK_M)
    zero = W * 0.0  # an fp32 scalar: both branches below must give the same types
    if rho != 0.0:
        tmx = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        ts = tl.zeros([BLOCK_M], dtype=tl.float32)
        mx = zero - 1.0e30  # finite start: the first rescale multiplies 0 by a finite number
        s = zero
        a = zero  # a masked row may hold padding garbage (even NaN): never read it
        z_row = z_ptr + n * stride_zn
        t_row = t_ptr + n * stride_tn
        lo = sp * SPLIT_LEN
        for start in range(lo, lo + SPLIT_LEN, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            t_bar = tl.zeros([BLOCK_V], dtype=tl.float32)
            t_m = t_row  # advanced by stride_tm per teacher: pointer steps, no int32 m * stride
            for m in range(0, M):
                t = tl.load(t_m + offs, mask=mask, other=0.0).to(tl.float32)
                t_bar += tl.load(w_ptr + m) * t
                if TEACHER_IS_LOGITS:
                    # Online logsumexp of teacher m, its state held in lane m of tmx / ts.
                    this = m_lane == m
                    old = tl.max(tl.where(this, tmx, -1.0e30), axis=0)
                    new = tl.maximum(old, tl.max(tl.where(mask, t, float("-inf")), axis=0))
                    add = tl.sum(tl.where(mask, tl.exp(t - new), 0.0), axis=0)
                    tsum = tl.sum(tl.where(this, ts, 0.0), axis=0) * tl.exp(old - new) + add
                    tmx = tl.where(this, new, tmx)
                    ts = tl.where(this, tsum, ts)
                t_m += stride_tm
            mx_new = tl.maximum(mx, tl.max(z, axis=0))
            alpha = tl.exp(mx - mx_new)
            e = tl.exp(z - mx_new)
            # e == 0 on padding lanes and -inf logits, where z or t̄ may be -inf: take 0, not 0·inf.
            inner = tl.where(e > 0.0, W * (z - mx_new) - t_bar, 0.0)
            a = alpha * (a + W * (mx - mx_new) * s) + tl.sum(e * inner, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            mx = mx_new
    else:
        # Neutral partials (lse = 0, KL = 0): the host merge and the backward see zeros.
        mx = zero
        s = zero + 1.0
        a = zero
        tmx = tl.zeros([BLOCK_M], dtype=tl.float32)
        ts = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    tl.store(mx_ptr + out, mx)
    tl.store(s_ptr + out, s)
    tl.store(a_ptr + out, a)
    if TEACHER_IS_LOGITS:
        m_mask = m_lane < M
        tl.store(tmx_ptr + m_lane * N * SPLITS + out, tmx, mask=m_mask)
        tl.store(ts_ptr + m_lane * N * SPLITS + out, ts, mask=m_mask)


@triton.jit
def _dense_kl_bwd_kernel(
    z_ptr,  # [N, V] student logits, last dim contiguous
    stride_zn,  # elements between student rows
    t_ptr,  # [M, N, V] teacher log-probs or logits, last dim contiguous
    stride_tm,  # elements between teachers
    stride_tn,  # elements between teacher rows
    tlse_ptr,  # [M, N] fp32 teacher logsumexp L_m; only read when TEACHER_IS_LOGITS
    w_ptr,  # [M] fp32 teacher weights w_m
    coef_ptr,  # [N] fp32 grad_output[n] ρ_n (0 on masked rows: the row is not read)
    lse_ptr,  # [N] fp32 student logsumexp log Σ_v e^{z_v}
    kl_ptr,  # [N] fp32 KL_w (unweighted by ρ)
    g_ptr,  # [N, V] out, student dtype: coef_n p ⊙ (W log p − lq̄ − KL_w)
    stride_gn,  # elements between gradient rows
    N,
    V,
    M,
    TEACHER_IS_LOGITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    coef = tl.load(coef_ptr + n)
    g = tl.zeros([BLOCK_V], dtype=tl.float32)
    if coef != 0.0:
        W = 0.0
        for m in range(0, M):
            W += tl.load(w_ptr + m)
        z = tl.load(z_ptr + n * stride_zn + offs, mask=mask, other=float("-inf")).to(tl.float32)
        lq_bar = tl.zeros([BLOCK_V], dtype=tl.float32)
        t_m = t_ptr + n * stride_tn
        for m in range(0, M):
            t = tl.load(t_m + offs, mask=mask, other=0.0).to(tl.float32)
            if TEACHER_IS_LOGITS:
                t = t - tl.load(tlse_ptr + m * N + n)
            lq_bar += tl.load(w_ptr + m) * t
            t_m += stride_tm
        log_p = z - tl.load(lse_ptr + n)
        p = tl.exp(log_p)
        # p == 0 (padding lanes, -inf logits): 0, not 0·inf.
        g = coef * p * tl.where(p > 0.0, W * log_p - lq_bar - tl.load(kl_ptr + n), 0.0)
    tl.store(g_ptr + n * stride_gn + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def _configs(blocks: tuple[int, ...], warps: tuple[int, ...]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_V": b}, num_warps=w) for b in blocks for w in warps]


# CUDA: the best (BLOCK_V, num_warps) per (V, M, …) is measured once per shape by autotune;
# six configurations each keep the first call's compile time to seconds.
# The forward streams a whole split per program, the backward one chunk per program.
_fwd_tuned = triton.autotune(
    configs=_configs((2048, 4096, 8192), (4, 8)),
    key=["V", "M", "SPLITS", "TEACHER_IS_LOGITS"],
)(_dense_kl_fwd_kernel)
_bwd_tuned = triton.autotune(
    configs=_configs((1024, 2048, 4096), (4, 8)),
    key=["V", "M", "TEACHER_IS_LOGITS"],
)(_dense_kl_bwd_kernel)

# Interpreter (and an explicit block_v): fixed parameters.
_INTERPRETER_BLOCK_V = MAX_BLOCK_V


# ---------------------------------------------------------------------------------------
# Launch parameters


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        if block_v <= 0 or block_v & (block_v - 1) or block_v > MAX_BLOCK_V:
            raise ValueError(f"block_v must be a power of two <= {MAX_BLOCK_V}, got {block_v}")
        return block_v
    return min(_INTERPRETER_BLOCK_V, triton.next_power_of_2(V))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 4096 else 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_v_splits(N: int, V: int, device: torch.device, v_splits: int | None = None) -> int:
    """Programs per row of a forward pass over V. Given explicitly (tests), else 1 off CUDA;
    on CUDA enough to give every SM _PROGRAMS_PER_SM programs when N rows alone are fewer,
    never a split shorter than MAX_BLOCK_V columns."""
    max_splits = triton.cdiv(V, MAX_BLOCK_V)
    if v_splits is not None:
        if v_splits < 1:
            raise ValueError(f"v_splits must be >= 1, got {v_splits}")
        return min(v_splits, max_splits)
    if device.type != "cuda":
        return 1
    want = _PROGRAMS_PER_SM * _sm_count(device.index or 0)
    return max(1, min(max_splits, triton.cdiv(want, max(N, 1))))


def split_len(V: int, splits: int) -> int:
    """Columns per split: V for one split, else a multiple of MAX_BLOCK_V covering V."""
    if splits == 1 and V <= MAX_BLOCK_V:
        return triton.next_power_of_2(V)
    if splits == 1:
        return triton.cdiv(V, MAX_BLOCK_V) * MAX_BLOCK_V
    return triton.cdiv(triton.cdiv(V, splits), MAX_BLOCK_V) * MAX_BLOCK_V


def merge_logsumexp(mx: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-split (max, Σ e^{x − max}) along the last dim: returns (max, rescale [.., SPLITS],
    so that the merged sum is (s · rescale).sum(-1))."""
    top = mx.max(dim=-1, keepdim=True).values
    return top.squeeze(-1), torch.exp(mx - top)


# ---------------------------------------------------------------------------------------
# Launchers


def _as_teacher_stack(teacher: torch.Tensor, N: int, V: int) -> torch.Tensor:
    if teacher.dim() == 2:
        teacher = teacher.unsqueeze(0)
    if teacher.dim() != 3 or teacher.shape[1:] != (N, V):
        raise ValueError(f"teacher must be [M, {N}, {V}] or [{N}, {V}], got {tuple(teacher.shape)}")
    if teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    return teacher


def default_teacher_weights(M: int, device: torch.device) -> torch.Tensor:
    """w_m = 1/M: with one teacher the plain KL, with several their average."""
    return torch.full((M,), 1.0 / M, dtype=torch.float32, device=device)


def teacher_weights_f32(w: torch.Tensor | None, M: int, device: torch.device) -> torch.Tensor:
    """[M] fp32 contiguous teacher weights on device; checks the length."""
    if w is None:
        return default_teacher_weights(M, device)
    if w.numel() != M:
        raise ValueError(f"teacher_weights must be [{M}] (one per teacher), got {tuple(w.shape)}")
    return w.detach().to(device=device, dtype=torch.float32).reshape(M).contiguous()


def row_weights_f32(rho: torch.Tensor | None, N: int, device: torch.device) -> torch.Tensor | None:
    """[N] fp32 contiguous row weights on device, or None; checks the length."""
    if rho is None:
        return None
    if rho.dim() != 1 or rho.shape[0] != N:
        raise ValueError(f"row_weights must be [{N}] (one per row), got {tuple(rho.shape)}")
    return rho.detach().to(device=device, dtype=torch.float32).contiguous()


def dense_kl_forward(
    student_logits: torch.Tensor,  # [N, V]
    teacher: torch.Tensor,  # [M, N, V] or [N, V]
    teacher_weights: torch.Tensor | None,  # [M]
    row_weights: torch.Tensor | None,  # [N]
    teacher_are_logits: bool,
    block_v: int | None = None,
    v_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One read of z and the teachers. Returns (KL_w [N] fp32 (not yet × ρ), student lse [N]
    fp32, ρ [N] fp32 (ones without row weights), teacher lse [M, N] fp32 or None)."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    N, V = z.shape
    t = _as_teacher_stack(teacher, N, V)
    M = t.shape[0]
    dev = z.device
    w = teacher_weights_f32(teacher_weights, M, dev)
    rho = row_weights_f32(row_weights, N, dev)
    splits = num_v_splits(N, V, dev, v_splits)
    seg = split_len(V, splits)
    mx, s, a = (torch.empty((N, splits), dtype=torch.float32, device=dev) for _ in range(3))
    tmx = ts = mx  # placeholder pointers, never touched unless the teacher sends logits
    if teacher_are_logits:
        tmx, ts = (torch.empty((M, N, splits), dtype=torch.float32, device=dev) for _ in range(2))
    args = (
        z, z.stride(0), t, t.stride(0), t.stride(1), w, rho if rho is not None else w,
        mx, s, a, tmx, ts, N, V, M, seg,
    )  # fmt: skip
    meta = dict(
        SPLITS=splits,
        TEACHER_IS_LOGITS=teacher_are_logits,
        HAS_ROW_WEIGHTS=rho is not None,
        BLOCK_M=triton.next_power_of_2(M),
    )
    if z.is_cuda and block_v is None:
        _fwd_tuned[(N, splits)](*args, **meta)
    else:
        block = min(_block_v(V, block_v), seg)
        _dense_kl_fwd_kernel[(N, splits)](*args, **meta, BLOCK_V=block, num_warps=_num_warps(block))
    if splits == 1:
        mx, s, a = mx[:, 0], s[:, 0], a[:, 0]
    else:  # merge the splits: the same rescaling as the online update, once per split
        top, r = merge_logsumexp(mx, s)
        a = (r * (a + w.sum() * (mx - top.unsqueeze(-1)) * s)).sum(-1)
        s = (r * s).sum(-1)
        mx = top
    log_s = s.log()
    kl = a / s - w.sum() * log_s
    t_lse = None
    if teacher_are_logits:
        top, r = merge_logsumexp(tmx, ts)
        t_lse = top + (r * ts).sum(-1).log()  # [M, N]
        kl = kl + (w.unsqueeze(-1) * t_lse).sum(0)
    if rho is not None:
        kl = torch.where(rho != 0, kl, 0.0)  # masked rows: exact zeros
    ones = torch.ones(N, dtype=torch.float32, device=dev) if rho is None else rho
    return kl, mx + log_s, ones, t_lse


def dense_kl_backward(
    student_logits: torch.Tensor,  # [N, V]
    teacher: torch.Tensor,  # [M, N, V] or [N, V], as given to the forward
    teacher_weights: torch.Tensor | None,  # [M]
    coef: torch.Tensor,  # [N] fp32 grad_output ρ
    lse: torch.Tensor,  # [N] fp32
    kl: torch.Tensor,  # [N] fp32 KL_w
    teacher_lse: torch.Tensor | None,  # [M, N] fp32 when the teacher sent logits
    block_v: int | None = None,
) -> torch.Tensor:
    """Recompute the gradient: [N, V] in the student's dtype, one fp32 multiply, one rounding."""
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    N, V = z.shape
    t = _as_teacher_stack(teacher, N, V)
    M = t.shape[0]
    w = teacher_weights_f32(teacher_weights, M, z.device)
    g = torch.empty_like(z)
    args = (
        z, z.stride(0), t, t.stride(0), t.stride(1),
        teacher_lse if teacher_lse is not None else lse, w, coef.contiguous(), lse, kl,
        g, g.stride(0), N, V, M,
    )  # fmt: skip
    if z.is_cuda and block_v is None:
        grid = lambda meta: (N, triton.cdiv(V, meta["BLOCK_V"]))
        _bwd_tuned[grid](*args, TEACHER_IS_LOGITS=teacher_lse is not None)
    else:
        block = _block_v(V, block_v)
        _dense_kl_bwd_kernel[(N, triton.cdiv(V, block))](
            *args, TEACHER_IS_LOGITS=teacher_lse is not None, BLOCK_V=block,
            num_warps=_num_warps(block),
        )  # fmt: skip
    return g


class DenseKLFunction(torch.autograd.Function):
    """kl[N] = ρ ⊙ Σ_m w_m KL(softmax(z) ‖ q_m). Saves z, the teachers and O(N·M) row
    statistics; the backward recomputes the gradient with grad_output folded in."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher: torch.Tensor,
        teacher_weights: torch.Tensor | None,
        row_weights: torch.Tensor | None,
        teacher_are_logits: bool,
        block_v: int | None,
        v_splits: int | None,
    ) -> torch.Tensor:
        kl, lse, rho, t_lse = dense_kl_forward(
            student_logits,
            teacher,
            teacher_weights,
            row_weights,
            teacher_are_logits,
            block_v,
            v_splits,
        )
        extra = (t_lse,) if t_lse is not None else ()
        ctx.save_for_backward(student_logits, teacher, kl, lse, rho, *extra)
        ctx.teacher_weights = teacher_weights
        ctx.block_v = block_v
        return rho * kl

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        z, t, kl, lse, rho, *extra = ctx.saved_tensors
        coef = grad_output.to(torch.float32) * rho  # [N]; 0 keeps a masked row unread
        g = dense_kl_backward(
            z, t, ctx.teacher_weights, coef, lse, kl, extra[0] if extra else None, ctx.block_v
        )
        return g, None, None, None, None, None, None


def dense_kl_triton(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    teacher_are_logits: bool = False,
    *,
    block_v: int | None = None,
    v_splits: int | None = None,
) -> torch.Tensor:
    """Triton Dense KL. Shapes: student_logits [N, V]; teacher_logprobs [M, N, V] or [N, V]
    (log-probs, or logits with teacher_are_logits=True); teacher_weights [M] (default 1/M);
    row_weights [N] (0 masks a row). Returns kl [N] fp32, differentiable w.r.t. the logits.
    block_v fixes the chunk (else autotuned on CUDA); v_splits fixes the programs per row
    of the forward (else chosen from N and the GPU's size)."""
    return DenseKLFunction.apply(
        student_logits,
        teacher_logprobs.detach(),
        teacher_weights,
        row_weights,
        teacher_are_logits,
        block_v,
        v_splits,
    )
