"""Fused LM head + top-K Dense KL + token log-prob: the hybrid loss's per-row inputs from the
student's hidden states, without ever building the [N, V] logits.

    fused_lm_head_topk_kl(h [N, d], weight [V, d], bias [V] | None, targets [N],
                          support_ids [N, K], teacher_logprobs_at_support [M, N, K] | [N, K],
                          ...) -> FusedLMHeadResult(kl, token_logprob, lse, student_mass, tail)

The maths, per row n (MATH.md § Top-K Dense gradient; the same as trainer/ops/reference.py
on z = h Wᵀ + b): lse = logsumexp(z), log p_i = z_i − lse, S the support (−1 = padding;
a repeated id counts once, at its first slot), W = Σ_m w_m, lq̄_i = Σ_m w_m log q_m,i
(missing entries filled by the rule in topk_support.py), and

    P_S = Σ_{i∈S} p_i,   kl_S = Σ_{i∈S} p_i (W log p_i − lq̄_i),   tail = (1 − P_S)(kl_S + W P_S)

    "sparse": kl = kl_S,  ∂/∂z_i = p_i (W log p_i − lq̄_i − kl_S) on S, 0 elsewhere (the paper's)
    "exact":  kl = kl_S,  ∂/∂z_j = p_j (1[j∈S] (W log p_j − lq̄_j + W) − (kl_S + W P_S))
    "renorm": kl = Σ_m w_m KL(softmax(z_S) ‖ q_m,S / Σ_S q_m), its exact (K-sparse) gradient

    token_logprob = log π(y_n) = z_{y_n} − lse,  ∂/∂z = e_y − p          (the Sparse term's)
    lse,                                          ∂/∂z = p

kl is multiplied by the row weight ρ_n; a row with ρ_n = 0 is padding: its hidden state is
never read and every output and gradient of it is 0. Every gradient above has the form
c_n p + (point masses at S and y), so the backward recomputes each chunk of z, forms that
chunk of the logit gradient and multiplies it into dh, dW and db at once: extra memory
O(N·K + N·chunk), never O(N·V). Note the gradient is dense over V whenever the token
log-prob (or "exact") carries a gradient, so the LM-head backward touches every row of W.

Two implementations of the V walks, same maths: fused_lm_head_reference.py (chunked torch:
the CPU fallback, and the float64 oracle on float64 inputs) and fused_lm_head_kernel.py
(Triton: CUDA, or CPU under TRITON_INTERPRET=1). The K-vector maths below is shared.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from trainer.ops import fused_lm_head_reference as ref
from trainer.ops.dispatch import Backend, use_triton
from trainer.ops.topk_support import TopKMode, dedupe_support, fill_missing_teacher_logprobs

_MODES = ("sparse", "exact", "renorm")
_NEG_BIG = -1.0e30  # finite "−inf" for padded slots of the renormalised softmax


class FusedLMHeadResult(NamedTuple):
    """Per-row outputs, all [N] (fp32, or fp64 for fp64 inputs); 0 on rows with ρ_n = 0.

    kl: ρ_n × the mode's loss; differentiable. token_logprob: log π(y_n); differentiable.
    lse: logsumexp_v z_nv; differentiable. student_mass: P_S; no gradient.
    tail: (1 − P_S)(kl_S + W P_S), what "sparse" drops; no gradient.
    """

    kl: torch.Tensor
    token_logprob: torch.Tensor
    lse: torch.Tensor
    student_mass: torch.Tensor
    tail: torch.Tensor


class SupportTerms(NamedTuple):
    kl: torch.Tensor  # [N] ρ × loss
    mass: torch.Tensor  # [N]
    tail: torch.Tensor  # [N]
    point: torch.Tensor  # [N, K] ρ × ∂kl/∂z at the support slots (without the p part)
    dense: torch.Tensor  # [N] ρ × the coefficient of p in ∂kl/∂z


def support_terms(
    z_s: torch.Tensor,  # [N, K] z at the support (compute dtype)
    lse: torch.Tensor,  # [N]
    valid: torch.Tensor,  # [N, K] bool
    lq: torch.Tensor,  # [M, N, K] filled teacher log-probs (0 where not valid)
    w: torch.Tensor,  # [M]
    rho: torch.Tensor,  # [N]
    mode: TopKMode,
) -> SupportTerms:
    """The mode's loss and its logit gradient in the form c_n p + Σ_{i∈S} a_ni e_i."""
    cdt = z_s.dtype
    lq, w = lq.to(cdt), w.to(cdt)
    W = w.sum()
    logp = z_s - lse.unsqueeze(-1)
    p = torch.where(valid, logp.exp(), 0.0)
    lq_bar = (w.view(-1, 1, 1) * lq).sum(0)
    term = torch.where(p > 0, W * logp - lq_bar, 0.0)  # 0·log 0 = 0 where p underflows
    kl_s = (p * term).sum(-1)
    mass = p.sum(-1)
    dense = torch.zeros_like(kl_s)
    if mode == "sparse":
        kl, point = kl_s, p * (term - kl_s.unsqueeze(-1))
    elif mode == "exact":
        kl, point = kl_s, p * torch.where(p > 0, term + W, 0.0)
        dense = -(kl_s + W * mass)
    else:  # renorm: softmax over z_S against each teacher renormalised on S
        logpt = torch.where(valid, z_s, _NEG_BIG).log_softmax(-1)
        pt = torch.where(valid, logpt.exp(), 0.0)
        lq_m = torch.where(valid.unsqueeze(0), lq, _NEG_BIG)
        lq_ren = torch.where(valid.unsqueeze(0), lq_m - lq_m.logsumexp(-1, keepdim=True), 0.0)
        t = torch.where(pt > 0, W * logpt - (w.view(-1, 1, 1) * lq_ren).sum(0), 0.0)
        kl = (pt * t).sum(-1)
        point = pt * (t - kl.unsqueeze(-1))
    keep = rho != 0
    zero = torch.zeros((), dtype=cdt, device=z_s.device)
    tail = (1.0 - mass) * (kl_s + W * mass)
    return SupportTerms(
        kl=rho * kl,
        mass=torch.where(keep, mass, zero),
        tail=torch.where(keep, tail, zero),
        point=rho.unsqueeze(-1) * point,
        dense=rho * dense,
    )


def _walks(triton: bool):
    if triton:
        from trainer.ops import fused_lm_head_kernel as k  # triton imported only when used

        return k.lse_and_gather, k.lm_head_backward
    return ref.lse_and_gather, ref.lm_head_backward


class FusedLMHeadTopKKL(torch.autograd.Function):
    """Saves h, W, b (references), the ids, lse [N] and the [N, K] support gradient."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ids, lq, w, rho, mode, triton, chunk):
        fwd, _ = _walks(triton)
        keep = rho != 0
        hk = torch.where(keep.unsqueeze(-1), h, 0.0)  # padding rows are never read
        y = torch.where(keep, targets, -1).unsqueeze(-1)
        all_ids = torch.cat([ids, y], dim=1)  # [N, K + 1]: the support, then y
        lse, zg = fwd(hk, weight, bias, all_ids, chunk)
        terms = support_terms(zg[:, :-1], lse, ids >= 0, lq, w, rho, mode)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        lp = torch.where(keep, zg[:, -1] - lse, zero)
        ctx.save_for_backward(h, weight, bias, all_ids, lse, terms.point, terms.dense, keep)
        ctx.triton, ctx.chunk = triton, chunk
        ctx.mark_non_differentiable(terms.mass, terms.tail)
        return terms.kl, lp, torch.where(keep, lse, zero), terms.mass, terms.tail

    @staticmethod
    def backward(ctx, g_kl, g_lp, g_lse, _g_mass, _g_tail):
        h, weight, bias, all_ids, lse, point_kl, dense_kl, keep = ctx.saved_tensors
        _, bwd = _walks(ctx.triton)
        cdt = lse.dtype

        def up(g):  # grad_output of an unused output arrives as None
            return torch.zeros_like(lse) if g is None else torch.where(keep, g.to(cdt), 0.0)

        g_kl, g_lp, g_lse = up(g_kl), up(g_lp), up(g_lse)
        point = torch.cat([g_kl.unsqueeze(-1) * point_kl, g_lp.unsqueeze(-1)], dim=1)
        dense = g_kl * dense_kl - g_lp + g_lse  # e_y − p for log π(y), p for lse
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        hk = torch.where(keep.unsqueeze(-1), h, 0.0)
        dh, dw, db = bwd(hk, weight, bias, lse, all_ids, point, dense, need_h, need_w,
                         need_b, ctx.chunk)  # fmt: skip
        return dh, dw, db, *(None,) * 8


def _check(h, weight, bias, targets, ids, rho) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, d] and weight [V, d]; got {tuple(h.shape)}, {tuple(weight.shape)}"
        )
    N, V = h.shape[0], weight.shape[0]
    if weight.dtype != h.dtype or (bias is not None and bias.dtype != h.dtype):
        raise ValueError(f"hidden, weight and bias must share a dtype; got {h.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")  # fmt: skip
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must be [{V}], got {tuple(bias.shape)}")
    if tuple(targets.shape) != (N,):
        raise ValueError(f"targets must be [{N}], got {tuple(targets.shape)}")
    if ids.dim() != 2 or ids.shape[0] != N:
        raise ValueError(f"support_ids must be [{N}, K], got {tuple(ids.shape)}")
    if rho is not None and tuple(rho.shape) != (N,):
        raise ValueError(f"row_weights must be [{N}], got {tuple(rho.shape)}")
    live = torch.ones(N, dtype=torch.bool, device=h.device) if rho is None else rho != 0
    bad_ids = ((ids >= V) | (ids < -1)) & live.unsqueeze(-1)
    if bool(bad_ids.any()):  # one host sync; an id out of range would read another row
        raise ValueError(f"support_ids must lie in [-1, {V - 1}] (V = {V}) on live rows")
    if bool((((targets < 0) | (targets >= V)) & live).any()):
        raise ValueError(f"targets must lie in [0, {V - 1}] (V = {V}) on live rows")


def fused_lm_head_topk_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs_at_support: torch.Tensor,
    teacher_leftover_logmass: torch.Tensor | None = None,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    mode: TopKMode = "sparse",
    *,
    teacher_num_returned: torch.Tensor | int | None = None,
    teacher_known: torch.Tensor | None = None,
    backend: Backend = "auto",
    chunk: int | None = None,
) -> FusedLMHeadResult:
    """The top-K Dense KL, log π(y), lse, P_S and tail per row from hidden states.

    hidden: [N, d] (bf16/fp16/fp32/fp64). weight: [V, d], bias: [V] or None, same dtype.
    targets: [N] int64 sampled ids y. support_ids: [N, K] int64, -1 = padding (repeats count
    once). teacher_logprobs_at_support: [M, N, K] or [N, K]; NaN (or teacher_known=False)
    marks entries to fill from teacher_leftover_logmass [M, N] or [N] and
    teacher_num_returned, by topk_support.fill_missing_teacher_logprobs.
    teacher_weights: [M] (default 1/M). row_weights: [N] ρ_n (0 = padding row).
    mode: "sparse" | "exact" | "renorm". chunk: vocabulary columns per step of the walk.
    Differentiable w.r.t. hidden, weight and bias through kl, token_logprob and lse.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be 'sparse', 'exact' or 'renorm', got {mode!r}")
    dev = hidden.device
    ids = support_ids.to(device=dev, dtype=torch.int64)
    targets = targets.to(device=dev, dtype=torch.int64)
    _check(hidden, weight, bias, targets, ids, row_weights)
    N, V = hidden.shape[0], weight.shape[0]
    cdt = ref.compute_dtype(hidden)
    rho = (
        torch.ones(N, dtype=cdt, device=dev)
        if row_weights is None
        else row_weights.detach().to(device=dev, dtype=cdt)
    )
    ids = torch.where((rho != 0).unsqueeze(-1), dedupe_support(ids), -1)
    lq_shape = tuple(teacher_logprobs_at_support.shape)
    if len(lq_shape) not in (2, 3) or lq_shape[-2:] != tuple(ids.shape):
        raise ValueError(
            f"teacher_logprobs_at_support must be [M, {N}, {ids.shape[1]}] or "
            f"[{N}, {ids.shape[1]}], got {lq_shape}"
        )
    known = None if teacher_known is None else teacher_known.to(dev)
    lq = fill_missing_teacher_logprobs(
        teacher_logprobs_at_support.detach().to(dev), ids, V,
        None if teacher_leftover_logmass is None else teacher_leftover_logmass.to(dev),
        teacher_num_returned, known,
    )  # fmt: skip
    M = lq.shape[0]
    if teacher_weights is not None and teacher_weights.numel() != M:
        raise ValueError(
            f"teacher_weights must be [{M}] (one per teacher), got {tuple(teacher_weights.shape)}"
        )
    w = (
        torch.full((M,), 1.0 / M, dtype=cdt, device=dev)
        if teacher_weights is None
        else teacher_weights.detach().to(device=dev, dtype=cdt).reshape(M)
    )
    triton = use_triton(hidden, backend)
    default_chunk = ref.DEFAULT_CHUNK
    if triton:
        from trainer.ops.fused_lm_head_kernel import DEFAULT_CHUNK as default_chunk
    out = FusedLMHeadTopKKL.apply(
        hidden, weight, bias, targets, ids, lq, w, rho, mode, triton, chunk or default_chunk
    )
    return FusedLMHeadResult(*out)
