"""Top-K Dense kernel (three modes), the support builder and the fill rule."""

from __future__ import annotations

import math

import pytest
import torch

from tests.trainer.ops.helpers import DEVICE, TOL, assert_grad_close, assert_kl_close
from trainer.ops import (
    build_support,
    dense_kl_reference,
    fill_missing_teacher_logprobs,
    teacher_logprobs_on_support,
    topk_kl,
    topk_kl_reference,
)
from trainer.ops.topk_kl_kernel import topk_kl_triton
from trainer.ops.topk_support import log_uniform_fill

MODES = ["sparse", "exact", "renorm"]


def _problem(gen, N, V, M, K, dtype, support="student", scale=3.0):
    z = (torch.randn(N, V, generator=gen) * scale).to(dtype)
    t_lp = (torch.randn(M, N, V, generator=gen) * 2).log_softmax(-1)
    if support == "student":
        ids = build_support("student", K, z)
    else:  # a union with the teacher's top-K: varying size, -1 padding
        ids = build_support("union", K, z, t_lp.topk(K, dim=-1).indices)
    lq = t_lp.gather(-1, ids.clamp_min(0).expand(M, -1, -1))
    w = torch.rand(M, generator=gen) + 0.1
    rho = torch.rand(N, generator=gen) + 0.5
    rho[torch.randperm(N, generator=gen)[: N // 4]] = 0.0
    go = torch.randn(N, generator=gen)
    return z, ids, lq, w, rho, go, t_lp


def _oracle(z, ids, lq, w, rho, go, mode):
    z64 = z.detach().double().requires_grad_(True)
    res = topk_kl_reference(z64, ids, lq.double(), w.double(), rho.double(), mode)
    res.kl.backward(go.double())
    return res, z64.grad


def _run(z, ids, lq, w, rho, go, mode, block_v=None):
    zz = z.detach().clone().to(DEVICE).requires_grad_(True)
    d = [x.to(DEVICE) for x in (ids, lq, w, rho, go)]
    res = topk_kl_triton(zz, d[0], d[1], d[2], d[3], mode, block_v=block_v)
    res.kl.backward(d[4])
    return [x.detach().cpu() for x in res], zz.grad.cpu()


def _on_support(ids, V):
    """[N, V] bool, True at the support ids (padding -1 goes to a dropped extra column)."""
    on = torch.zeros(ids.shape[0], V + 1, dtype=torch.bool)
    return on.scatter_(1, torch.where(ids >= 0, ids, V), True)[:, :V]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("support", ["student", "union"])
def test_matches_oracle(gen, dtype, mode, support):
    z, ids, lq, w, rho, go, _ = _problem(gen, 10, 1000, 2, 37, dtype, support)
    (kl, mass, tail), g = _run(z, ids, lq, w, rho, go, mode, block_v=128)
    ref, g_ref = _oracle(z, ids, lq, w, rho, go, mode)
    assert_kl_close(kl, ref.kl, dtype)
    assert_kl_close(mass, ref.student_mass, dtype)
    assert_kl_close(tail, ref.tail, dtype)
    assert_grad_close(g, g_ref, dtype)
    assert g.dtype == dtype and (g[rho == 0] == 0).all() and (kl[rho == 0] == 0).all()
    if mode != "exact":  # K-sparse: nothing off the support
        assert (g[~_on_support(ids, g.shape[1])] == 0).all()


def test_large_vocab(gen):
    z, ids, lq, w, rho, go, _ = _problem(gen, 2, 151_936, 1, 64, torch.bfloat16)
    rho.fill_(1.0)
    (kl, mass, _tail), g = _run(z, ids, lq, w, rho, go, "sparse", block_v=8192)
    ref, g_ref = _oracle(z, ids, lq, w, rho, go, "sparse")
    assert_kl_close(kl, ref.kl, torch.bfloat16)
    assert_kl_close(mass, ref.student_mass, torch.bfloat16)
    assert_grad_close(g, g_ref, torch.bfloat16)


def test_k_at_least_v_recovers_full_kl(gen):
    """S = the whole vocabulary: every mode equals the full-vocabulary KL and gradient,
    P_S = 1 and the tail is 0."""
    V = 300
    z, ids, lq, w, rho, go, t_lp = _problem(gen, 6, V, 2, V + 7, torch.float32)
    assert ids.shape[1] == V
    z64 = z.double().requires_grad_(True)
    full = dense_kl_reference(z64, t_lp.double(), w.double(), rho.double())
    full.backward(go.double())
    for mode in MODES:
        (kl, mass, tail), g = _run(z, ids, lq, w, rho, go, mode, block_v=64)
        assert_kl_close(kl, full.detach(), torch.float32)
        assert_grad_close(g, z64.grad, torch.float32)
        keep = rho != 0
        torch.testing.assert_close(mass[keep], torch.ones(int(keep.sum())), atol=1e-5, rtol=0)
        assert tail.abs().max() < 1e-4


def test_ties_in_top_k(gen):
    """Logits on a coarse grid: the top-K boundary cuts through ties. Ids stay unique, the
    kernel agrees with the oracle, and a tied id swapped in gives the same P_S."""
    z = torch.randint(-3, 4, (8, 200), generator=gen).float()
    ids = build_support("student", 20, z)
    assert all(len(set(r.tolist())) == 20 for r in ids)
    t_lp = (torch.randn(1, 8, 200, generator=gen)).log_softmax(-1)
    lq = t_lp.gather(-1, ids.unsqueeze(0))
    rho, go, w = torch.ones(8), torch.randn(8, generator=gen), torch.ones(1)
    for mode in MODES:
        (kl, mass, _), g = _run(z, ids, lq, w, rho, go, mode, block_v=64)
        ref, g_ref = _oracle(z, ids, lq, w, rho, go, mode)
        assert_kl_close(kl, ref.kl, torch.float32)
        assert_grad_close(g, g_ref, torch.float32)
    kth = z.gather(-1, ids).min(-1).values  # the tied boundary value
    alt = ids.clone()
    for n in range(8):
        out = [j for j in range(200) if z[n, j] == kth[n] and j not in set(ids[n].tolist())]
        if out:
            alt[n, (z[n, ids[n]] == kth[n]).nonzero()[0, 0]] = out[0]
    (_, mass_alt, _), _ = _run(z, alt, t_lp.gather(-1, alt.unsqueeze(0)), w, rho, go, "sparse")
    torch.testing.assert_close(mass_alt, mass, atol=1e-6, rtol=1e-6)


def test_tail_is_what_sparse_drops(gen):
    """exact − sparse: W p_i (1 − P_S) on S, and off S it sums to −ρ · tail."""
    z, ids, lq, w, rho, go, _ = _problem(gen, 6, 400, 2, 16, torch.float32, scale=1.0)
    go = torch.ones(6)
    (_, mass, tail), g_sparse = _run(z, ids, lq, w, rho, go, "sparse", block_v=128)
    _, g_exact = _run(z, ids, lq, w, rho, go, "exact", block_v=128)
    on = _on_support(ids, z.shape[1])
    diff = (g_exact - g_sparse).double()
    off_sum = torch.where(on, 0.0, diff).sum(-1)
    torch.testing.assert_close(off_sum, -(rho * tail).double(), atol=1e-5, rtol=1e-4)
    p = z.double().softmax(-1)
    want_on = rho.double()[:, None] * w.sum().double() * p * (1 - mass.double())[:, None]
    torch.testing.assert_close(torch.where(on, diff, 0.0), torch.where(on, want_on, 0.0),
                               atol=1e-6, rtol=1e-4)  # fmt: skip
    assert (tail[rho != 0] > 0).all() and (mass < 1).all()


def test_renorm_is_a_proper_kl(gen):
    """renorm: KL(softmax(z_S) ‖ q_S / Σ q_S) ≥ 0, and 0 when the student matches q on S."""
    V, K = 500, 24
    t_lp = (torch.randn(1, 4, V, generator=gen) * 2).log_softmax(-1)
    ids = t_lp[0].topk(K, dim=-1).indices
    lq = t_lp.gather(-1, ids.unsqueeze(0))
    z = torch.randn(4, V, generator=gen)
    z.scatter_(1, ids, lq[0] + 5.0)  # same shape as q on S, plus an offset
    (kl, _, _), g = _run(z, ids, lq, torch.ones(1), torch.ones(4), torch.ones(4), "renorm")
    assert kl.abs().max() < 1e-5 and g.abs().max() < 1e-6


def test_fill_rule_values(gen):
    """The documented rule: leftover mass over the V − n_R ids the teacher did not return."""
    N, V, Kt = 5, 200, 8
    t_lp = (torch.randn(N, V, generator=gen) * 2).log_softmax(-1)
    t_ids = t_lp.topk(Kt, dim=-1).indices
    t_top = t_lp.gather(-1, t_ids)
    leftover = torch.log1p(-t_top.exp().sum(-1))
    z = torch.randn(N, V, generator=gen) * 2
    sup = build_support("student", 12, z)
    got = teacher_logprobs_on_support(sup, V, t_ids, t_top, leftover)
    in_top = (sup.unsqueeze(-1) == t_ids.unsqueeze(1)).any(-1)
    for n in range(N):
        fill = log_uniform_fill(math.exp(leftover[n].item()), V, Kt)
        want = torch.where(in_top[n], t_lp[n, sup[n]], torch.tensor(fill))
        torch.testing.assert_close(got[n], want, atol=1e-5, rtol=1e-6)
    # Query ids: returned values are used as is; the leftover shrinks by their mass.
    q_ids = torch.cat([sup[:, :5], sup[:, :2]], dim=-1)  # with duplicates
    q_lp = t_lp.gather(-1, q_ids)
    got_q = teacher_logprobs_on_support(sup, V, t_ids, t_top, leftover, q_ids, q_lp)
    torch.testing.assert_close(got_q[:, :5], t_lp.gather(-1, sup[:, :5]), atol=1e-6, rtol=0)
    for n in range(N):
        extra = [i for i in set(sup[n, :5].tolist()) if i not in set(t_ids[n].tolist())]
        left = 1 - t_top[n].exp().sum().item() - sum(t_lp[n, i].exp().item() for i in extra)
        fill = log_uniform_fill(left, V, Kt + len(extra))
        for k in range(5, 12):
            if not in_top[n, k]:
                assert abs(got_q[n, k].item() - fill) < 1e-4
    # The topk_kl entry: NaN marks missing ids; n_R passed explicitly.
    raw = torch.where(in_top, t_lp.gather(-1, sup), float("nan"))
    filled = fill_missing_teacher_logprobs(raw, sup, V, leftover, Kt)
    torch.testing.assert_close(filled[0], got, atol=1e-5, rtol=1e-6)
    a = topk_kl(z, sup, raw, leftover, teacher_num_returned=Kt, backend="torch")
    b = topk_kl(z, sup, got, backend="torch")
    torch.testing.assert_close(a.kl, b.kl)
    with pytest.raises(ValueError, match="leftover"):
        topk_kl(z, sup, raw)


def test_build_support_union(gen):
    z = torch.randn(4, 50, generator=gen)
    t_ids = torch.randint(0, 50, (2, 4, 6), generator=gen)  # two teachers, may overlap
    u = build_support("union", 6, z, t_ids)
    s = set
    for n in range(4):
        row = u[n].tolist()
        valid = [i for i in row if i >= 0]
        assert len(valid) == len(s(valid))  # unique
        assert row[len(valid) :] == [-1] * (len(row) - len(valid))  # padding at the end
        want = s(z[n].topk(6).indices.tolist()) | s(t_ids[:, n].flatten().tolist())
        assert s(valid) == want
    assert build_support("student", 99, z).shape == (4, 50)  # K >= V is clipped to V


def test_dispatcher_topk(gen):
    z, ids, lq, w, rho, _go, _ = _problem(gen, 4, 120, 1, 8, torch.float32)
    for mode in MODES:
        a = topk_kl(z.to(DEVICE), ids.to(DEVICE), lq.to(DEVICE), None, w, rho, mode)
        b = topk_kl(z, ids, lq, None, w, rho, mode, backend="torch")
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x.cpu(), y, atol=2e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_topk_runs_on_cuda():
    gen = torch.Generator().manual_seed(0)
    z, ids, lq, w, rho, go, _ = _problem(gen, 64, 151_936, 2, 64, torch.bfloat16)
    for mode in MODES:
        zz = z.cuda().requires_grad_(True)
        res = topk_kl(zz, ids.cuda(), lq.cuda(), None, w.cuda(), rho.cuda(), mode)
        res.kl.backward(go.cuda())
        ref, g_ref = _oracle(z, ids, lq, w, rho, go, mode)
        assert_kl_close(res.kl.detach().cpu(), ref.kl, torch.bfloat16)
        assert_grad_close(zz.grad.cpu(), g_ref, torch.bfloat16)
