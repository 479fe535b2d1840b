"""Public entry points for the Dense kernels: Triton where it can run, pure torch otherwise.

Triton runs on CUDA tensors, and on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1, which must be set before triton is first imported: the tests' conftest
does it). Everywhere else, including when triton is not installed, the pure-torch reference
in reference.py is the fallback: same maths, same outputs, [N, V] intermediates.
This module is the one place that reads the environment for that choice.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Literal

import torch

from trainer.ops.reference import dense_kl_reference, topk_kl_reference
from trainer.ops.topk_support import (
    TopKKLResult,
    TopKMode,
    check_support_ids,
    dedupe_support,
    fill_missing_teacher_logprobs,
)

Backend = Literal["auto", "triton", "torch"]


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor, backend: Backend = "auto") -> bool:
    """Whether the Triton kernels will handle tensor x under the given backend choice."""
    if backend == "torch":
        return False
    can = (
        _triton_installed() and x.dtype != torch.float64 and (x.is_cuda or triton_interpreter_on())
    )
    if backend == "triton" and not can:
        raise RuntimeError(
            "backend='triton' needs triton installed, a non-float64 tensor, and a CUDA tensor "
            "or TRITON_INTERPRET=1 set before triton is imported"
        )
    return can


def dense_kl(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    teacher_are_logits: bool = False,
    *,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Per-row weighted reverse KL, differentiable w.r.t. the student logits.

    student_logits: [N, V] (bf16/fp16/fp32; fp64 goes to the torch reference).
    teacher_logprobs: [M, N, V] or [N, V] log-probs (logits if teacher_are_logits).
    teacher_weights: [M] w_m, default 1/M. row_weights: [N] ρ_n, 0 masks a row.
    Returns kl [N] fp32 = ρ_n Σ_m w_m KL(softmax(z_n) ‖ q_m,n); its gradient w.r.t. z_n is
    ρ_n Σ_m w_m p ⊙ (log p − log q_m − KL_m), times grad_output[n].
    """
    if use_triton(student_logits, backend):
        from trainer.ops.dense_kl_kernel import dense_kl_triton  # triton imported only when used

        return dense_kl_triton(
            student_logits, teacher_logprobs, teacher_weights, row_weights, teacher_are_logits
        )
    return dense_kl_reference(
        student_logits, teacher_logprobs, teacher_weights, row_weights, teacher_are_logits
    )


def _prepare(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs_at_support: torch.Tensor,
    teacher_leftover_logmass: torch.Tensor | None,
    teacher_num_returned: torch.Tensor | int | None,
    teacher_known: torch.Tensor | None,
    row_weights: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks shared by both backends, before the fill rule reads anything: the support
    range (one host sync), the row weights' length; then drops repeated ids (S is a set)
    and fills the teachers' missing log-probs. Returns (ids [N, K], lq [M, N, K])."""
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [N, V], got {tuple(student_logits.shape)}")
    N, V = student_logits.shape
    check_support_ids(support_ids, N, V)
    if row_weights is not None and (row_weights.dim() != 1 or row_weights.shape[0] != N):
        raise ValueError(f"row_weights must be [{N}] (one per row), got {tuple(row_weights.shape)}")
    ids = dedupe_support(support_ids.to(student_logits.device)).contiguous()
    lq = fill_missing_teacher_logprobs(
        teacher_logprobs_at_support,
        ids,
        V,
        teacher_leftover_logmass,
        teacher_num_returned,
        teacher_known,
        row_weights=row_weights,
    )
    return ids, lq


def topk_kl(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs_at_support: torch.Tensor,
    teacher_leftover_logmass: torch.Tensor | None = None,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    mode: TopKMode = "sparse",
    *,
    teacher_num_returned: torch.Tensor | int | None = None,
    teacher_known: torch.Tensor | None = None,
    sparse_grad: bool = False,
    backend: Backend = "auto",
) -> TopKKLResult:
    """Top-K KL on a support S (MATH.md § Top-K Dense gradient; modes in topk_kl_kernel.py).

    student_logits: [N, V]. support_ids: [N, K] int, -1 = padding; ids outside [-1, V)
    raise ValueError; an id repeated within a row counts once (later copies are dropped).
    teacher_logprobs_at_support: [M, N, K] or [N, K]; NaN (or teacher_known=False) marks ids
    the teacher did not return, filled by the rule in topk_support.py from
    teacher_leftover_logmass [M, N] or [N] (log of the teacher mass outside its top-K) and
    teacher_num_returned (n_R; default: the known slots of the row). Masked rows are never
    filled nor read.
    teacher_weights: [M] (default 1/M). row_weights: [N]. mode: "sparse" | "exact" | "renorm".
    sparse_grad (Triton path, "sparse"/"renorm"): the logits' gradient is a sparse COO
    [N, V] tensor with N·K entries, for a caller whose backward accepts one (a leaf, or an
    LM-head matmul); the torch path always gives a dense gradient.
    Returns TopKKLResult(kl [N], student_mass [N], tail [N]), fp32; kl is differentiable.
    """
    ids, lq = _prepare(
        student_logits,
        support_ids,
        teacher_logprobs_at_support,
        teacher_leftover_logmass,
        teacher_num_returned,
        teacher_known,
        row_weights,
    )
    if use_triton(student_logits, backend):
        from trainer.ops.topk_kl_kernel import topk_kl_triton

        return topk_kl_triton(
            student_logits, ids, lq, teacher_weights, row_weights, mode,
            sparse_grad=sparse_grad, support_prepared=True,
        )  # fmt: skip
    return topk_kl_reference(student_logits, ids, lq, teacher_weights, row_weights, mode)


def topk_kl_support_grad(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_logprobs_at_support: torch.Tensor,
    teacher_leftover_logmass: torch.Tensor | None = None,
    teacher_weights: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    mode: TopKMode = "sparse",
    grad_output: torch.Tensor | None = None,
    *,
    teacher_num_returned: torch.Tensor | int | None = None,
    teacher_known: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> tuple[TopKKLResult, torch.Tensor, torch.Tensor]:
    """topk_kl without autograd, for a caller that applies the K-sparse gradient itself.

    Same arguments as topk_kl ("sparse" or "renorm" only: the "exact" gradient is dense),
    plus grad_output [N] (default ones). Returns (TopKKLResult with kl detached, support ids
    [N, K] int64 as used (repeats turned into -1), gradient values [N, K] fp32 at those ids:
    grad_output[n] · ∂kl[n]/∂z[n, ids[n, k]], 0 on padding). Nothing of size [N, V] is
    written on the Triton path; an LM-head backward is then dh[n] = Σ_k g[n, k] W[ids[n, k]]
    and dW[ids[n, k]] += g[n, k] h[n]. The torch path computes a dense gradient and gathers.
    """
    if mode == "exact":
        raise ValueError("the 'exact' gradient is dense: use topk_kl and autograd instead")
    ids, lq = _prepare(
        student_logits,
        support_ids,
        teacher_logprobs_at_support,
        teacher_leftover_logmass,
        teacher_num_returned,
        teacher_known,
        row_weights,
    )
    if use_triton(student_logits, backend):
        from trainer.ops.topk_kl_kernel import topk_kl_support_grad_triton

        return topk_kl_support_grad_triton(
            student_logits, ids, lq, teacher_weights, row_weights, mode, grad_output,
            support_prepared=True,
        )  # fmt: skip
    z = student_logits.detach().requires_grad_(True)
    with torch.enable_grad():
        res = topk_kl_reference(z, ids, lq, teacher_weights, row_weights, mode)
        go = torch.ones_like(res.kl) if grad_output is None else grad_output.to(res.kl)
        (grad,) = torch.autograd.grad(res.kl, z, go)
    vals = torch.where(ids >= 0, grad.gather(-1, ids.clamp_min(0)), 0.0).to(torch.float32)
    return TopKKLResult(res.kl.detach(), res.student_mass, res.tail), ids, vals
