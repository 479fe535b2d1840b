"""Full-vocabulary Dense kernel against the float64 oracle, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.ops.helpers import DEVICE, TOL, assert_grad_close, assert_kl_close
from trainer.ops import dense_kl, dense_kl_reference, use_triton
from trainer.ops.dense_kl_kernel import dense_kl_triton

DTYPES = list(TOL)


def _inputs(gen, N, V, M, dtype, teacher_logits=False, scale=3.0):
    z = (torch.randn(N, V, generator=gen) * scale).to(dtype)
    t = torch.randn(M, N, V, generator=gen) * 2.0
    t = t if teacher_logits else t.log_softmax(-1)
    w = torch.rand(M, generator=gen) + 0.1
    rho = torch.rand(N, generator=gen) + 0.5
    rho[torch.randperm(N, generator=gen)[: N // 4]] = 0.0  # some masked rows
    go = torch.randn(N, generator=gen)  # grad_output != 1
    return z, t, w, rho, go


def _oracle(z, t, w, rho, go, teacher_logits=False):
    z64 = z.detach().double().requires_grad_(True)
    kl = dense_kl_reference(z64, t.double(), w.double(), rho.double(), teacher_logits)
    kl.backward(go.double())
    return kl.detach(), z64.grad


def _run(z, t, w, rho, go, teacher_logits=False, block_v=None):
    zz = z.detach().clone().to(DEVICE).requires_grad_(True)
    dev = [x.to(DEVICE) for x in (t, w, rho, go)]
    kl = dense_kl_triton(zz, dev[0], dev[1], dev[2], teacher_logits, block_v=block_v)
    kl.backward(dev[3])
    return kl.detach().cpu(), zz.grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("teacher_logits", [False, True], ids=["logprobs", "logits"])
@pytest.mark.parametrize("M", [1, 3])
def test_matches_oracle_small_block(gen, dtype, teacher_logits, M):
    """V = 1000 with BLOCK_V = 128: a ragged last chunk and many online rescales."""
    z, t, w, rho, go = _inputs(gen, 12, 1000, M, dtype, teacher_logits)
    kl, g = _run(z, t, w, rho, go, teacher_logits, block_v=128)
    kl_ref, g_ref = _oracle(z, t, w, rho, go, teacher_logits)
    assert kl.dtype == torch.float32 and g.dtype == dtype
    assert_kl_close(kl, kl_ref, dtype)
    assert_grad_close(g, g_ref, dtype)
    masked = rho == 0
    assert (kl[masked] == 0).all() and (g[masked] == 0).all()


@pytest.mark.parametrize("V", [151_936, 262_144])
def test_large_vocab_large_block(gen, V):
    """V = 151,936 (Qwen) and 262,144 (Gemma) with BLOCK_V = 8192; two rows keep it fast."""
    z, t, w, rho, go = _inputs(gen, 2, V, 1, torch.bfloat16)
    rho.fill_(1.0)
    kl, g = _run(z, t, w, rho, go, block_v=8192)
    kl_ref, g_ref = _oracle(z, t, w, rho, go)
    assert_kl_close(kl, kl_ref, torch.bfloat16)
    assert_grad_close(g, g_ref, torch.bfloat16)


@pytest.mark.parametrize("scale", [0.01, 30.0])
def test_extreme_logit_scales(gen, scale):
    """Near-uniform and near-one-hot students: no cancellation blow-up in A/S − W log S."""
    z, t, w, rho, go = _inputs(gen, 6, 777, 2, torch.float32, scale=scale)
    kl, g = _run(z, t, w, rho, go, block_v=256)
    kl_ref, g_ref = _oracle(z, t, w, rho, go)
    # fp32 z − max(z) carries an absolute error ~|z|·2^-24, so log p is only that accurate,
    # and the gradient ρ·go·p·(W log p − lq̄ − KL) inherits it times ρ·|go|·(1 + W).
    zmax, W = z.abs().max().item(), w.sum().item()
    amp = (rho * go).abs().max().item() * (1 + W)
    torch.testing.assert_close(kl.double(), kl_ref, atol=2e-5 + 4e-7 * zmax * W, rtol=1e-5)
    assert (g.double() - g_ref).abs().max() <= 1e-6 + 2e-7 * zmax * amp
    if scale < 1:
        assert_grad_close(g, g_ref, torch.float32)


def test_masked_rows_may_hold_garbage(gen):
    z, t, w, rho, go = _inputs(gen, 8, 300, 1, torch.float32)
    z[rho == 0] = float("nan")
    t[:, rho == 0] = float("nan")
    kl, g = _run(z, t, w, rho, go, block_v=64)
    assert torch.isfinite(kl).all() and torch.isfinite(g).all()
    assert (kl[rho == 0] == 0).all() and (g[rho == 0] == 0).all()
    z0 = torch.where(torch.isnan(z), 0.0, z)
    t0 = torch.where(torch.isnan(t), 0.0, t)
    kl_ref, g_ref = _oracle(z0, t0, w, rho, go)
    assert_kl_close(kl, kl_ref, torch.float32)
    assert_grad_close(g, g_ref, torch.float32)


def test_strided_rows_and_no_weights(gen):
    """Rows with a stride > V (a slice of a padded vocabulary) and default weights."""
    big = torch.randn(5, 530, generator=gen) * 2
    z = big[:, :500]
    t = torch.randn(5, 500, generator=gen).log_softmax(-1)
    zz = z.clone().to(DEVICE).requires_grad_(True)
    kl = dense_kl_triton(zz, t.to(DEVICE), block_v=128)
    kl.sum().backward()
    z64 = z.double().requires_grad_(True)
    kl_ref = dense_kl_reference(z64, t.double())
    kl_ref.sum().backward()
    assert_kl_close(kl.detach().cpu(), kl_ref.detach(), torch.float32)
    assert_grad_close(zz.grad.cpu(), z64.grad, torch.float32)


def test_forward_without_grad_and_double_backward(gen):
    z, t, _w, _rho, _go = _inputs(gen, 4, 200, 1, torch.float32)
    with torch.no_grad():
        kl_nograd = dense_kl_triton(z.to(DEVICE).requires_grad_(True), t.to(DEVICE), block_v=64)
    zz = z.detach().clone().to(DEVICE).requires_grad_(True)
    kl = dense_kl_triton(zz, t.to(DEVICE), block_v=64)
    torch.testing.assert_close(kl_nograd, kl.detach())
    go = torch.randn(4, generator=gen).to(DEVICE)
    kl.backward(go, retain_graph=True)
    first = zz.grad.clone()
    zz.grad = None
    kl.backward(go)  # the gradient is recomputed, not consumed: a second backward agrees
    torch.testing.assert_close(zz.grad, first, atol=0, rtol=0)


def test_dispatcher(gen):
    z, t, w, rho, _go = _inputs(gen, 4, 100, 2, torch.float32)
    assert use_triton(z.to(DEVICE)) and not use_triton(z.double()) and not use_triton(z, "torch")
    a = dense_kl(z.to(DEVICE), t.to(DEVICE), w.to(DEVICE), rho.to(DEVICE))
    b = dense_kl(z, t, w, rho, backend="torch")
    torch.testing.assert_close(a.cpu(), b, atol=2e-5, rtol=1e-5)
    assert dense_kl(z.double(), t.double()).dtype == torch.float64  # float64 -> the oracle


def test_kl_properties(gen):
    """KL(p‖p) = 0 with a zero gradient; KL ≥ 0; weights are linear; logits ≡ log-probs."""
    z = torch.randn(6, 257, generator=gen) * 2
    t = torch.randn(2, 6, 257, generator=gen) * 2
    same = dense_kl_triton(z.to(DEVICE), z.log_softmax(-1).to(DEVICE), block_v=64).cpu()
    assert same.abs().max() < 1e-5
    w = torch.rand(2, generator=gen)
    as_logits = dense_kl_triton(z.to(DEVICE), t.to(DEVICE), w.to(DEVICE), None, True).cpu()
    as_lp = dense_kl_triton(z.to(DEVICE), t.log_softmax(-1).to(DEVICE), w.to(DEVICE)).cpu()
    torch.testing.assert_close(as_logits, as_lp, atol=2e-5, rtol=1e-5)
    assert (as_lp >= -1e-6).all()
    per = [dense_kl_triton(z.to(DEVICE), t[m].log_softmax(-1).to(DEVICE)).cpu() for m in (0, 1)]
    torch.testing.assert_close(as_lp, w[0] * per[0] + w[1] * per[1], atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_path_runs_on_cuda():
    """The compiled kernel on a real GPU at the benchmark's vocabulary, bf16."""
    gen = torch.Generator().manual_seed(0)
    z, t, w, rho, go = _inputs(gen, 64, 151_936, 2, torch.bfloat16)
    zz = z.cuda().requires_grad_(True)
    assert use_triton(zz)
    kl = dense_kl(zz, t.cuda(), w.cuda(), rho.cuda())
    kl.backward(go.cuda())
    kl_ref, g_ref = _oracle(z, t, w, rho, go)
    assert_kl_close(kl.detach().cpu(), kl_ref, torch.bfloat16)
    assert_grad_close(zz.grad.cpu(), g_ref, torch.bfloat16)
