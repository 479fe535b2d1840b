"""Full-vocabulary Dense-gradient kernel: per-row reverse KL(p ‖ q) and its logit gradient.

The maths (MATH.md § Logit-level Dense gradient, § Schedules and extensions). For one row
(one token position) with student logits z ∈ R^V, p = softmax(z), teachers m = 1..M with
log-probs log q_m and weights w_m, W = Σ_m w_m and lq̄ = Σ_m w_m log q_m:

    KL_w      = Σ_m w_m KL(p ‖ q_m) = Σ_v p_v (W log p_v − lq̄_v)
    ∂KL_w/∂z  = Σ_m w_m p ⊙ (log p − log q_m − KL_m) = p ⊙ (W log p − lq̄ − KL_w)

so M teachers cost one extra read each but a single pass of the gradient. The kernel returns
kl[n] = ρ_n KL_w(n) for a row weight ρ_n (0 masks a row) and writes ρ_n ∂KL_w/∂z_n in the
forward, into one [N, V] buffer of the student's dtype (the only [N, V] tensor it allocates);
the backward scales that buffer in place by grad_output[n].

Pass 1 (online over V in BLOCK_V chunks) keeps a running max mx and

    S = Σ e^{z − mx},     A = Σ e^{z − mx} (W (z − mx) − lq̄)

rescaled when mx grows to mx': S ← e^{mx − mx'} S,  A ← e^{mx − mx'} (A + W (mx − mx') S).
Then log p = z − mx − log S and KL_w = A / S − W log S. Keeping z − mx ≤ 0 inside A avoids
the cancellation of Σ p z − lse at large logits. Pass 2 re-reads z and the teachers and
writes the gradient. Teacher *logits* are turned into log-probs with a per-(teacher, row)
logsumexp computed by a small kernel first ([M, N] fp32), never a [M, N, V] copy.

All row offsets are int64 (N·V exceeds 2^31 at V = 151,936); accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest chunk of the vocabulary one program holds in registers at a time.
MAX_BLOCK_V = 8192


@triton.jit
def _row_lse_kernel(
    x_ptr,  # [M, N, V] teacher logits, any float dtype, last dim contiguous
    out_ptr,  # [M, N] fp32: logsumexp over V of each (teacher, row)
    stride_xm,  # elements between teachers
    stride_xn,  # elements between rows
    N,
    V,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # one program per (teacher, row); pid = m * N + n
    m = pid // N
    n = pid % N
    x_row = x_ptr + m * stride_xm + n * stride_xn
    mx = -1.0e30  # finite start: the first rescale then multiplies 0 by a finite number
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        mx_new = tl.maximum(mx, tl.max(x, axis=0))
        s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(x - mx_new), axis=0)
        mx = mx_new
    tl.store(out_ptr + pid, mx + tl.log(s))


@triton.jit
def _weighted_teacher_logprob(
    t_row_ptr,  # teacher block base for teacher 0 at this row (log-probs or logits)
    stride_tm,  # elements between teachers
    lse_ptr,  # [M, N] fp32 teacher logsumexp (read only when TEACHER_IS_LOGITS)
    w_ptr,  # [M] fp32 teacher weights w_m
    n,  # int64 row index
    N,
    M,
    offs,  # [BLOCK_V] column indices of this chunk
    mask,  # [BLOCK_V] offs < V
    TEACHER_IS_LOGITS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """lq̄ = Σ_m w_m log q_m on one chunk (fp32)."""
    lq_bar = tl.zeros([BLOCK_V], dtype=tl.float32)
    t_m = t_row_ptr  # advanced by stride_tm per teacher: pointer steps, no int32 m * stride
    lse_m = lse_ptr + n
    for m in range(0, M):
        w = tl.load(w_ptr + m)
        t = tl.load(t_m + offs, mask=mask, other=0.0).to(tl.float32)
        if TEACHER_IS_LOGITS:
            t = t - tl.load(lse_m)
        lq_bar += w * t
        t_m += stride_tm
        lse_m += N
    return lq_bar


@triton.jit
def _dense_kl_kernel(
    z_ptr,  # [N, V] student logits (bf16/fp16/fp32), last dim contiguous
    stride_zn,  # elements between student rows
    t_ptr,  # [M, N, V] teacher log-probs (or logits if TEACHER_IS_LOGITS), last dim contiguous
    stride_tm,  # elements between teachers
    stride_tn,  # elements between teacher rows
    lse_ptr,  # [M, N] fp32 teacher logsumexp; only read when TEACHER_IS_LOGITS
    w_ptr,  # [M] fp32 teacher weights w_m (not required to sum to 1)
    rho_ptr,  # [N] fp32 row weights ρ_n; only read when HAS_ROW_WEIGHTS
    kl_ptr,  # [N] fp32 out: ρ_n Σ_m w_m KL(p_n ‖ q_m,n)
    g_ptr,  # [N, V] out, student dtype: ρ_n p ⊙ (W log p − lq̄ − KL_w); only if COMPUTE_GRAD
    stride_gn,  # elements between gradient rows
    N,
    V,
    M,
    TEACHER_IS_LOGITS: tl.constexpr,
    HAS_ROW_WEIGHTS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)  # one program per row; int64 so n * stride never wraps
    z_row = z_ptr + n * stride_zn
    t_row = t_ptr + n * stride_tn
    g_row = g_ptr + n * stride_gn
    rho = 1.0
    if HAS_ROW_WEIGHTS:
        rho = tl.load(rho_ptr + n)
    W = 0.0  # Σ_m w_m, summed here rather than on the host to avoid a device sync
    for m in range(0, M):
        W += tl.load(w_ptr + m)

    if rho != 0.0:
        # Pass 1: online max, S and A (see module docstring).
        mx = -1.0e30  # finite start: the first rescale then multiplies 0 by a finite number
        s = 0.0
        a = 0.0
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            lq_bar = _weighted_teacher_logprob(
                t_row, stride_tm, lse_ptr, w_ptr, n, N, M, offs, mask, TEACHER_IS_LOGITS, BLOCK_V
            )
            mx_new = tl.maximum(mx, tl.max(z, axis=0))
            alpha = tl.exp(mx - mx_new)
            e = tl.exp(z - mx_new)
            # e == 0 on padding lanes and -inf logits, where z or lq̄ may be -inf: take 0, not 0·inf.
            inner = tl.where(e > 0.0, W * (z - mx_new) - lq_bar, 0.0)
            a = alpha * (a + W * (mx - mx_new) * s) + tl.sum(e * inner, axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            mx = mx_new
        log_s = tl.log(s)
        kl = a / s - W * log_s
        tl.store(kl_ptr + n, rho * kl)

        # Pass 2: the gradient, computed now so the backward is one in-place scale.
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                lq_bar = _weighted_teacher_logprob(
                    t_row, stride_tm, lse_ptr, w_ptr, n, N, M, offs, mask, TEACHER_IS_LOGITS,
                    BLOCK_V,
                )  # fmt: skip
                log_p = z - mx - log_s
                p = tl.exp(log_p)
                inner = tl.where(p > 0.0, W * log_p - lq_bar - kl, 0.0)
                g = rho * p * inner
                tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
    else:
        # A masked row may hold padding garbage (even NaN): never read it, write exact zeros.
        tl.store(kl_ptr + n, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                zeros = tl.zeros([BLOCK_V], dtype=g_ptr.dtype.element_ty)
                tl.store(g_row + offs, zeros, mask=offs < V)


@triton.jit
def _scale_rows_kernel(
    g_ptr,  # [N, V] gradient buffer (student dtype), scaled in place
    stride_gn,  # elements between rows
    go_ptr,  # [N] fp32 grad_output
    V,
    BLOCK_V: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    go = tl.load(go_ptr + n)
    g = tl.load(g_ptr + n * stride_gn + offs, mask=mask, other=0.0).to(tl.float32)
    # Multiply in fp32: casting grad_output to a bf16 gradient's dtype would round it too.
    tl.store(g_ptr + n * stride_gn + offs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# Launchers


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        if block_v & (block_v - 1):
            raise ValueError(f"block_v must be a power of two, got {block_v}")
        return block_v
    return min(MAX_BLOCK_V, triton.next_power_of_2(V))


def _num_warps(block_v: int) -> int:
    return 8 if block_v >= 4096 else 4


def scale_rows_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad[n, :] *= grad_output[n], in place; grad [N, V] any float dtype, grad_output [N]."""
    N, V = grad.shape
    go = grad_output.detach().to(torch.float32).contiguous()
    block = min(4096, triton.next_power_of_2(V))
    grid = (N, triton.cdiv(V, block))
    _scale_rows_kernel[grid](grad, grad.stride(0), go, V, BLOCK_V=block, num_warps=4)
    return grad


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


def dense_kl_forward(
    student_logits: torch.Tensor,  # [N, V]
    teacher: torch.Tensor,  # [M, N, V] or [N, V]
    teacher_weights: torch.Tensor | None,  # [M]
    row_weights: torch.Tensor | None,  # [N]
    teacher_are_logits: bool,
    compute_grad: bool,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel; returns kl [N] fp32 and the gradient [N, V] (student dtype) or None."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    z = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()
    N, V = z.shape
    t = _as_teacher_stack(teacher, N, V)
    M = t.shape[0]
    w = default_teacher_weights(M, z.device) if teacher_weights is None else teacher_weights
    w = w.detach().to(device=z.device, dtype=torch.float32).contiguous()
    if w.shape != (M,):
        raise ValueError(f"teacher_weights must be [{M}], got {tuple(w.shape)}")
    rho = None
    if row_weights is not None:
        rho = row_weights.detach().to(device=z.device, dtype=torch.float32).contiguous()
        if rho.shape != (N,):
            raise ValueError(f"row_weights must be [{N}], got {tuple(rho.shape)}")

    block = _block_v(V, block_v)
    kl = torch.empty(N, dtype=torch.float32, device=z.device)
    grad = torch.empty_like(z) if compute_grad else None
    lse = kl  # placeholder pointer, never read unless the teacher sends logits
    if teacher_are_logits:
        lse = torch.empty((M, N), dtype=torch.float32, device=z.device)
        _row_lse_kernel[(M * N,)](
            t, lse, t.stride(0), t.stride(1), N, V, BLOCK_V=block, num_warps=_num_warps(block)
        )
    _dense_kl_kernel[(N,)](
        z,
        z.stride(0),
        t,
        t.stride(0),
        t.stride(1),
        lse,
        w,
        rho if rho is not None else kl,
        kl,
        grad if grad is not None else z,
        grad.stride(0) if grad is not None else 0,
        N,
        V,
        M,
        TEACHER_IS_LOGITS=teacher_are_logits,
        HAS_ROW_WEIGHTS=rho is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block,
        num_warps=_num_warps(block),
    )
    return kl, grad


class DenseKLFunction(torch.autograd.Function):
    """kl[N] = ρ ⊙ Σ_m w_m KL(softmax(z) ‖ q_m); the gradient is computed in the forward.

    Saves only the [N, V] gradient buffer, and scales it in place in the backward, so a
    second backward through the same graph is refused rather than silently wrong.
    """

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher: torch.Tensor,
        teacher_weights: torch.Tensor | None,
        row_weights: torch.Tensor | None,
        teacher_are_logits: bool,
        compute_grad: bool,
        block_v: int | None,
    ) -> torch.Tensor:
        kl, grad = dense_kl_forward(
            student_logits,
            teacher,
            teacher_weights,
            row_weights,
            teacher_are_logits,
            compute_grad,
            block_v,
        )
        ctx.grad = grad
        return kl

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "dense_kl: backward called twice, or the forward ran without grad enabled"
            )
        ctx.grad = None  # the buffer is consumed in place below
        return scale_rows_(grad, grad_output), None, None, None, None, None, None


def dense_kl_triton(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    teacher_are_logits: bool = False,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Triton Dense KL. Shapes: student_logits [N, V]; teacher_logprobs [M, N, V] or [N, V]
    (log-probs, or logits with teacher_are_logits=True); teacher_weights [M] (default 1/M);
    row_weights [N] (0 masks a row). Returns kl [N] fp32, differentiable w.r.t. the logits.
    """
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return DenseKLFunction.apply(
        student_logits,
        teacher_logprobs.detach(),
        teacher_weights,
        row_weights,
        teacher_are_logits,
        compute_grad,
        block_v,
    )
