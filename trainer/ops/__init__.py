"""Dense-gradient ops: full-vocabulary and top-K reverse KL with hand-written gradients.

Public API (dispatching to Triton on CUDA or under TRITON_INTERPRET=1, else pure torch):
dense_kl, topk_kl, topk_kl_support_grad, build_support, teacher_logprobs_on_support,
fill_missing_teacher_logprobs; fused_lm_head_topk_kl (the LM head, top-K KL and log π(y)
from hidden states, without [N, V] logits).
"""

from trainer.ops.dispatch import dense_kl, topk_kl, topk_kl_support_grad, use_triton
from trainer.ops.fused_lm_head import FusedLMHeadResult, fused_lm_head_topk_kl
from trainer.ops.reference import dense_kl_reference, topk_kl_reference
from trainer.ops.topk_support import (
    FILL_MIN_MASS,
    TopKKLResult,
    TopKMode,
    build_support,
    fill_missing_teacher_logprobs,
    teacher_logprobs_on_support,
)

__all__ = [
    "FILL_MIN_MASS",
    "FusedLMHeadResult",
    "TopKKLResult",
    "TopKMode",
    "build_support",
    "dense_kl",
    "dense_kl_reference",
    "fill_missing_teacher_logprobs",
    "fused_lm_head_topk_kl",
    "teacher_logprobs_on_support",
    "topk_kl",
    "topk_kl_reference",
    "topk_kl_support_grad",
    "use_triton",
]
