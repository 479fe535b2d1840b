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
from trainer.ops.topk_support import TopKKLResult, TopKMode, fill_missing_teacher_logprobs

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
    backend: Backend = "auto",
) -> TopKKLResult:
    """Top-K KL on a support S (MATH.md § Top-K Dense gradient; modes in topk_kl_kernel.py).

    student_logits: [N, V]. support_ids: [N, K] int64, -1 = padding, unique per row.
    teacher_logprobs_at_support: [M, N, K] or [N, K]; NaN (or teacher_known=False) marks ids
    the teacher did not return, filled by the rule in topk_support.py from
    teacher_leftover_logmass [M, N] or [N] (log of the teacher mass outside its top-K) and
    teacher_num_returned (n_R; default: the known slots of the row).
    teacher_weights: [M] (default 1/M). row_weights: [N]. mode: "sparse" | "exact" | "renorm".
    Returns TopKKLResult(kl [N], student_mass [N], tail [N]), fp32; kl is differentiable.
    """
    lq = fill_missing_teacher_logprobs(
        teacher_logprobs_at_support,
        support_ids,
        student_logits.shape[-1],
        teacher_leftover_logmass,
        teacher_num_returned,
        teacher_known,
    )
    if use_triton(student_logits, backend):
        from trainer.ops.topk_kl_kernel import topk_kl_triton

        return topk_kl_triton(student_logits, support_ids, lq, teacher_weights, row_weights, mode)
    return topk_kl_reference(student_logits, support_ids, lq, teacher_weights, row_weights, mode)
