"""Shared helpers for the kernel tests: device choice and the dtype tolerance table."""

from __future__ import annotations

import torch

from trainer.ops.dispatch import triton_interpreter_on

# Compiled kernels on CUDA when present, else the interpreter on CPU (see ../conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreter_on() else "cpu"

# Inputs are rounded to the dtype first and the float64 oracle sees the same rounded values,
# so what remains is fp32 accumulation (kl) and the rounding of the gradient to the student
# dtype, once (the Dense kernels compute grad_output · ∂kl/∂z in fp32 in the backward:
# test_kl_launch_paths.py::test_bf16_gradient_is_rounded_once): fp16 has 11 significant
# bits, bf16 8, and the interpreter truncates fp32 -> bf16 (1 ulp = 2^-7 relative); bf16
# keeps 2 ulps of slack for fp32 cancellation near zero.
# grad_atol is relative to the largest |gradient| of the batch (entries near 0 carry the
# absolute error of log p − log q − KL times p, not a relative one).
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"kl_atol": 2e-5, "kl_rtol": 1e-5, "grad_rtol": 1e-5, "grad_atol": 2e-6},
    torch.float16: {"kl_atol": 2e-5, "kl_rtol": 1e-5, "grad_rtol": 2e-3, "grad_atol": 2e-4},
    torch.bfloat16: {"kl_atol": 2e-5, "kl_rtol": 1e-5, "grad_rtol": 1.6e-2, "grad_atol": 2e-3},
}


def assert_grad_close(
    got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, slack: float = 1.0
) -> None:
    """|got − want| <= grad_rtol · |want| + slack · grad_atol · max|want|. slack > 1 for
    large logits: fp32 z − max(z) then carries an absolute error ∝ |z|."""
    got, want = got.double(), want.double()
    scale = want.abs().max().clamp_min(1e-12)
    bound = TOL[dtype]["grad_rtol"] * want.abs() + slack * TOL[dtype]["grad_atol"] * scale
    err = (got - want).abs() - bound
    assert err.max() <= 0, (
        f"max excess {err.max().item():.3g}; max abs err {(got - want).abs().max().item():.3g} "
        f"at scale {scale.item():.3g}"
    )


def assert_kl_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    t = TOL[dtype]
    torch.testing.assert_close(
        got.double(), want.double(), atol=t["kl_atol"], rtol=t["kl_rtol"], equal_nan=False
    )
