"""Fused LM head + top-K KL + token log-prob against the unfused path in float64.

The oracle materialises z = h Wᵀ + b and runs trainer/ops/reference.py (autograd in
float64) plus log_softmax for log π(y); the fused op must match its outputs and its
gradients w.r.t. h, W and b, in every mode, on both walks (chunked torch, Triton under the
interpreter here), without ever allocating an [N, V] tensor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.trainer.ops.helpers import assert_grad_close
from trainer.ops import topk_kl, topk_kl_reference
from trainer.ops.fused_lm_head import fused_lm_head_topk_kl

MODES = ["sparse", "exact", "renorm"]


def _problem(gen, N=13, d=24, V=203, K=7, M=2, bias=True):
    """Random hidden states, head, supports with padding and repeats, teachers, row weights.
    Returns the inputs and `oracle_ids`: the support with every repeat replaced by -1."""
    h = torch.randn(N, d, generator=gen, dtype=torch.float64)
    W = torch.randn(V, d, generator=gen, dtype=torch.float64) * 0.6
    b = torch.randn(V, generator=gen, dtype=torch.float64) if bias else None
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])
    oracle_ids = ids.clone()
    ids[0, -2:] = -1  # padding at the end of a row, as a union has
    ids[1, 2] = -1  # and in the middle
    ids[2, 5] = ids[2, 1]  # a repeat counts once (first slot)
    ids[4, 3] = ids[4, 0]
    oracle_ids[ids < 0] = -1
    oracle_ids[2, 5] = oracle_ids[4, 3] = -1
    y = torch.randint(0, V, (N,), generator=gen)
    y[3] = ids[3, 2]  # the sampled token inside the support
    lq = (torch.randn(M, N, V, generator=gen) * 2).log_softmax(-1)
    lq = lq.gather(-1, ids.clamp_min(0).expand(M, -1, -1))  # fp32, exactly as the oracle's
    w = torch.rand(M, generator=gen) + 0.1
    rho = torch.rand(N, generator=gen) + 0.5
    rho[[5, 9]] = 0.0  # padding rows
    h[5] = float("nan")  # never read
    return h, W, b, y, ids, oracle_ids, lq, w, rho


def _oracle(h, W, b, y, oracle_ids, lq, w, rho, mode, gouts):
    """Unfused float64: materialised logits → reference.py, autograd for the gradients."""
    keep = rho != 0
    hh = h.detach().double().requires_grad_(True)
    WW = W.detach().double().requires_grad_(True)
    bb = None if b is None else b.detach().double().requires_grad_(True)
    z = torch.where(keep.unsqueeze(-1), hh, 0.0) @ WW.T
    z = z if bb is None else z + bb
    res = topk_kl_reference(z, oracle_ids, lq.double(), w.double(), rho.double(), mode)
    lse = torch.where(keep, z.logsumexp(-1), 0.0)
    lp = torch.where(keep, z.log_softmax(-1).gather(1, y.view(-1, 1)).squeeze(1), 0.0)
    g_kl, g_lp, g_lse = (g.double() for g in gouts)
    (res.kl * g_kl + lp * g_lp + lse * g_lse).sum().backward()
    outs = (res.kl, lp, lse, res.student_mass, res.tail)
    return outs, (hh.grad, WW.grad, None if bb is None else bb.grad)


def _fused(h, W, b, y, ids, lq, w, rho, mode, gouts, dtype, backend, chunk, lq_extra=None):
    leaves = [x.detach().to(dtype).requires_grad_(True) for x in (h, W)]
    bb = None if b is None else b.detach().to(dtype).requires_grad_(True)
    res = fused_lm_head_topk_kl(
        leaves[0], leaves[1], bb, y, ids, lq, lq_extra, w, rho, mode, backend=backend, chunk=chunk
    )
    g_kl, g_lp, g_lse = (g.to(res.kl.dtype) for g in gouts)
    (res.kl * g_kl + res.token_logprob * g_lp + res.lse * g_lse).sum().backward()
    return res, (leaves[0].grad, leaves[1].grad, None if bb is None else bb.grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "backend,dtype,chunk",
    [
        ("torch", torch.float64, 17),  # the float64 oracle mode: rounding only
        ("torch", torch.float32, 64),
        ("torch", torch.float32, 4096),  # one chunk
        ("triton", torch.float32, 64),
        ("triton", torch.float32, 50),  # chunk not a power of two, last one partial
    ],
)
def test_matches_unfused_oracle(mode, backend, dtype, chunk):
    gen = torch.Generator().manual_seed(hash((mode, backend, chunk)) & 0xFFFF)
    h, W, b, y, ids, oracle_ids, lq, w, rho = _problem(gen)
    # Rounded to the test dtype first, so the oracle sees the same inputs.
    h, W, b = h.to(dtype).double(), W.to(dtype).double(), b.to(dtype).double()
    gouts = [torch.randn(h.shape[0], generator=gen) for _ in range(3)]  # grad_output != 1
    want, want_g = _oracle(h, W, b, y, oracle_ids, lq, w, rho, mode, gouts)
    got, got_g = _fused(h, W, b, y, ids, lq, w, rho, mode, gouts, dtype, backend, chunk)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, g_out, w_out in zip(got._fields, got, want, strict=True):
        assert g_out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        torch.testing.assert_close(g_out.double(), w_out.double(), atol=tol, rtol=tol, msg=name)
    for g, wg in zip(got_g, want_g, strict=True):
        assert g.dtype == dtype and torch.isfinite(g).all()
        if dtype == torch.float64:
            torch.testing.assert_close(g, wg, atol=1e-10, rtol=1e-10)
        else:
            assert_grad_close(g, wg, torch.float32, slack=4.0)
    assert (got_g[0][rho == 0] == 0).all()  # padding rows get no gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_bias_kl_only_and_one_teacher(backend):
    """bias=None, a single [N, K] teacher, default weights, no row weights, and only kl in
    the loss (the unused outputs' grad_output arrives as None)."""
    gen = torch.Generator().manual_seed(7)
    h, W, _, y, ids, oracle_ids, lq, _, _ = _problem(gen, N=11, d=16, V=97, K=7, M=1, bias=False)
    h[5] = 0.3
    rho = torch.ones(h.shape[0])
    gk = torch.randn(h.shape[0], generator=gen)
    zero = torch.zeros_like(gk)
    want, want_g = _oracle(h, W, None, y, oracle_ids, lq, torch.ones(1), rho, "sparse",
                           [gk, zero, zero])  # fmt: skip
    hh, WW = (x.float().requires_grad_(True) for x in (h, W))
    res = fused_lm_head_topk_kl(hh, WW, None, y, ids, lq[0], backend=backend, chunk=32)
    res.kl.backward(gk)
    torch.testing.assert_close(res.kl.double(), want[0], atol=2e-5, rtol=2e-5)
    assert_grad_close(hh.grad, want_g[0], torch.float32, slack=4.0)
    assert_grad_close(WW.grad, want_g[1], torch.float32, slack=4.0)


def test_fill_rule_is_the_topk_support_one():
    """NaN = not returned: filled from the leftover mass exactly as topk_kl fills it."""
    gen = torch.Generator().manual_seed(3)
    h, W, b, y, _, _, lq, w, rho = _problem(gen)
    ids = torch.stack([torch.randperm(W.shape[0], generator=gen)[:7] for _ in range(13)])
    lq = lq.clone()
    lq[0, :, 4:] = float("nan")
    lq[1, ::2, 1] = float("nan")
    left = torch.rand(2, 13, generator=gen).clamp_min(0.05).log()
    h[5] = 0.0
    z = h @ W.T + b
    want = topk_kl(z.float(), ids, lq, left, w, rho, "exact", backend="torch")
    got = fused_lm_head_topk_kl(h.float(), W.float(), b.float(), y, ids, lq, left, w, rho,
                                "exact", backend="torch", chunk=64)  # fmt: skip
    torch.testing.assert_close(got.kl, want.kl, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.student_mass, want.student_mass, atol=2e-6, rtol=1e-5)


class _LargestOutput(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any torch op produces (bytes: the
    Triton interpreter moves arguments as uint8 storages)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _largest_allocation(fn) -> int:
    with _LargestOutput() as mode:
        fn()
    return mode.largest


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_never_allocates_n_by_v(backend):
    """Forward + backward never produce a tensor of N·V elements; the unfused path does
    (which shows the detector sees them). The largest allowed: a chunk [N, C] or dW [V, d]."""
    gen = torch.Generator().manual_seed(11)
    N, d, V, K, C = 24, 4, 4096, 6, 512
    h = torch.randn(N, d, generator=gen, requires_grad=True)
    W = torch.randn(V, d, generator=gen, requires_grad=True)
    b = torch.randn(V, generator=gen, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=gen)
    ids = torch.randint(0, V, (N, K), generator=gen)
    lq = torch.randn(N, K, generator=gen) - 5

    def fused():
        r = fused_lm_head_topk_kl(h, W, b, y, ids, lq, mode="exact", backend=backend, chunk=C)
        (r.kl.sum() + r.token_logprob.sum()).backward()

    def unfused():
        z = h @ W.T + b
        lp = z.log_softmax(-1).gather(1, y.view(-1, 1))
        (topk_kl(z, ids, lq, mode="exact", backend="torch").kl.sum() + lp.sum()).backward()

    fp32 = 4
    bound = max(N * C, V * d) * fp32
    assert bound * 4 <= N * V * fp32
    assert _largest_allocation(unfused) >= N * V * fp32
    assert _largest_allocation(fused) <= bound


def test_bad_input_names_the_field_and_bound():
    gen = torch.Generator().manual_seed(5)
    h, W, b, y, ids, _, lq, w, rho = _problem(gen)
    h, W, b = h.float(), W.float(), b.float()
    V = W.shape[0]
    args = dict(teacher_weights=w, row_weights=rho)
    bad = ids.clone()
    bad[0, 0] = V
    with pytest.raises(ValueError, match=rf"support_ids must lie in \[-1, {V - 1}\]"):
        fused_lm_head_topk_kl(h, W, b, y, bad, lq, **args)
    bad[0, 0] = -2
    with pytest.raises(ValueError, match="support_ids must lie in"):
        fused_lm_head_topk_kl(h, W, b, y, bad, lq, **args)
    bad_y = y.clone()
    bad_y[0] = V
    with pytest.raises(ValueError, match=rf"targets must lie in \[0, {V - 1}\]"):
        fused_lm_head_topk_kl(h, W, b, bad_y, ids, lq, **args)
    with pytest.raises(ValueError, match=r"row_weights must be \[13\]"):
        fused_lm_head_topk_kl(h, W, b, y, ids, lq, teacher_weights=w, row_weights=rho[:-1])
    with pytest.raises(ValueError, match=r"teacher_weights must be \[2\]"):
        fused_lm_head_topk_kl(h, W, b, y, ids, lq, teacher_weights=w[:1], row_weights=rho)
    with pytest.raises(ValueError, match="mode must be"):
        fused_lm_head_topk_kl(h, W, b, y, ids, lq, mode="dense")
    with pytest.raises(ValueError, match="share a dtype"):
        fused_lm_head_topk_kl(h, W.double(), b, y, ids, lq)
    with pytest.raises(ValueError, match=r"teacher_logprobs_at_support must be \[M, 13, 7\]"):
        fused_lm_head_topk_kl(h, W, b, y, ids, lq[..., :-1], **args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_bf16_matches_the_float64_oracle(mode):
    """Compiled Triton on CUDA in bf16 against the chunked float64 torch walk on the same
    bf16-rounded inputs (bf16 logits and gradients: ~2^-8 relative)."""
    gen = torch.Generator().manual_seed(1)
    N, d, V, K = 512, 256, 32000, 64
    h = torch.randn(N, d, generator=gen).bfloat16()
    W = (torch.randn(V, d, generator=gen) * 0.1).bfloat16()
    y = torch.randint(0, V, (N,), generator=gen)
    ids = torch.stack([torch.randperm(V, generator=gen)[:K] for _ in range(N)])
    lq = torch.randn(N, K, generator=gen) - 8
    gk, gl = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    outs = []
    for dev, dt in (("cuda", torch.bfloat16), ("cpu", torch.float64)):
        hh = h.to(dev, dt).requires_grad_(True)
        WW = W.to(dev, dt).requires_grad_(True)
        r = fused_lm_head_topk_kl(hh, WW, None, y.to(dev), ids.to(dev), lq.to(dev), mode=mode)
        (r.kl * gk.to(dev, r.kl.dtype) + r.token_logprob * gl.to(dev, r.kl.dtype)).sum().backward()
        outs.append([x.detach().double().cpu() for x in (*r, hh.grad, WW.grad)])
    for got, want in zip(*outs, strict=True):
        scale = want.abs().max().clamp_min(1e-6)
        assert ((got - want).abs() <= 2e-2 * want.abs() + 1e-2 * scale).all()
