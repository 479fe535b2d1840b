"""Costs, discounted future returns, baselines, the Sparse surrogate and the hybrid loss."""

from __future__ import annotations

import pytest
import torch

from trainer.objective import (
    advantages,
    baseline,
    combine_rewards,
    future_returns,
    group_advantages,
    hybrid_loss,
    normalise,
    sparse_surrogate,
    token_costs,
)
from trainer.ops import dense_kl

DT = torch.float64


def _padded(gen, B, T):
    """A batch with random lengths 1..T (prefix masks)."""
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(DT)
    return mask, lengths


def _naive_returns(c, lengths, gamma, reward, lam):
    B, T = c.shape
    g = torch.zeros(B, T, dtype=DT)
    for b in range(B):
        for t in range(int(lengths[b])):
            g[b, t] = sum(gamma ** (k - t) * c[b, k] for k in range(t + 1, int(lengths[b])))
            g[b, t] -= lam * reward[b]
    return g


@pytest.mark.parametrize("gamma", [0.0, 0.37, 0.9, 1.0])
@pytest.mark.parametrize("T", [1, 7, 33])
def test_future_returns_match_the_definition(gen, gamma, T):
    """G_t = Σ_{k>t} γ^(k−t) c_k − λ r: k > t only, reward undiscounted, 0 on padding."""
    B = 6
    mask, lengths = _padded(gen, B, T)
    c = torch.randn(B, T, generator=gen, dtype=DT) * mask
    r = torch.randn(B, generator=gen, dtype=DT)
    lam = float(torch.rand((), generator=gen)) + 0.1
    got = future_returns(c, mask, gamma, r, lam)
    torch.testing.assert_close(got, _naive_returns(c, lengths, gamma, r, lam), atol=1e-12, rtol=0)
    last = lengths - 1
    torch.testing.assert_close(got[torch.arange(B), last], -lam * r)  # nothing after the end


def test_future_returns_ignore_padding_garbage(gen):
    mask = _padded(gen, 4, 9)[0]
    c = torch.randn(4, 9, generator=gen, dtype=DT)
    clean = future_returns(c * mask, mask, 0.8)
    dirty = future_returns(torch.where(mask.bool(), c, float("nan")), mask, 0.8)
    torch.testing.assert_close(clean, dirty)
    with pytest.raises(ValueError):
        future_returns(c, mask, 1.5)


def test_token_costs_weighted_teachers(gen):
    B, T, M = 3, 5, 2
    mask, _ = _padded(gen, B, T)
    lp = torch.randn(B, T, generator=gen, dtype=DT)
    lq = torch.randn(M, B, T, generator=gen, dtype=DT)
    w = torch.rand(M, generator=gen, dtype=DT)
    c = token_costs(lp, lq, w, mask)
    want = (w[0] * (lp - lq[0]) + w[1] * (lp - lq[1])) * mask
    torch.testing.assert_close(c, want)
    torch.testing.assert_close(token_costs(lp, lq[0], None, mask), (lp - lq[0]) * mask)
    torch.testing.assert_close(token_costs(lp, lq, None, mask), (lp - lq.mean(0)) * mask)


def test_combine_rewards(gen):
    r = torch.randn(3, 8, generator=gen, dtype=DT)
    a = torch.rand(3, generator=gen, dtype=DT)
    torch.testing.assert_close(combine_rewards(r, a), a[0] * r[0] + a[1] * r[1] + a[2] * r[2])
    torch.testing.assert_close(combine_rewards(r[0]), r[0])
    with pytest.raises(ValueError):
        combine_rewards(r, a[:2])


def test_baselines(gen):
    G, P = 4, 3
    v = torch.randn(G * P, generator=gen, dtype=DT)
    loo = baseline(v, G, "loo")
    for i in range(G * P):
        grp = v[(i // G) * G : (i // G + 1) * G]
        others = torch.cat([grp[: i % G], grp[i % G + 1 :]])
        torch.testing.assert_close(loo.offset[i], others.mean())
    assert (loo.scale == 1).all()
    ms = baseline(v, G, "mean_std")
    grouped = v.view(P, G)
    torch.testing.assert_close(ms.offset.view(P, G), grouped.mean(-1, keepdim=True).expand(P, G))
    std = grouped.std(-1, unbiased=False, keepdim=True).expand(P, G)
    torch.testing.assert_close(ms.scale.view(P, G), std + 1e-6)
    none = baseline(v, G, "none")
    assert (none.offset == 0).all() and (none.scale == 1).all()
    with pytest.raises(ValueError):
        baseline(v, 5, "loo")  # 12 is not a multiple of 5
    with pytest.raises(ValueError):
        baseline(v, 1, "loo")


def test_advantages_and_surrogate_gradient(gen):
    """∇ surrogate = normalise(∇ log π · A); A treated as a constant."""
    B, T = 4, 6
    mask, lengths = _padded(gen, B, T)
    lp = torch.randn(B, T, generator=gen, dtype=DT, requires_grad=True)
    g = torch.randn(B, T, generator=gen, dtype=DT) * mask
    base = baseline(torch.randn(B, generator=gen, dtype=DT), 2, "loo")
    adv = advantages(g, mask, base)
    torch.testing.assert_close(adv, (g - base.offset[:, None]) * mask)
    adv_leaf = adv.clone().requires_grad_(True)
    sparse_surrogate(lp, adv_leaf, mask, "sequence").backward()
    torch.testing.assert_close(lp.grad, adv * mask / B)
    assert adv_leaf.grad is None  # stop-gradient on the advantage
    lp.grad = None
    sparse_surrogate(lp, adv, mask, "token").backward()
    torch.testing.assert_close(lp.grad, adv * mask / lengths.sum())


def test_normalisation_choices(gen):
    B, T = 5, 7
    mask, lengths = _padded(gen, B, T)
    x = torch.randn(B, T, generator=gen, dtype=DT) * mask
    seq = normalise(x, mask, "sequence")
    tok = normalise(x, mask, "token")
    torch.testing.assert_close(seq, x.sum() / B)
    torch.testing.assert_close(tok, x.sum() / lengths.sum())
    w = torch.rand(B, generator=gen, dtype=DT)
    torch.testing.assert_close(normalise(x, mask, "sequence", w), (w * x.sum(-1)).sum() / w.sum())
    with pytest.raises(ValueError):
        normalise(x, mask, "batch")  # type: ignore[arg-type]


@pytest.mark.parametrize("normalisation", ["sequence", "token"])
def test_hybrid_loss_gradient_is_dense_plus_sparse(gen, normalisation):
    """The hybrid loss's gradient w.r.t. the logits is exactly β·∇Dense + ∇Sparse, the
    Dense KL coming from the kernel (Triton under the interpreter) on [B·T, V] rows."""
    B, T, V, M, J, G = 4, 5, 64, 2, 2, 2
    mask = _padded(gen, B, T)[0].float()
    logits = torch.randn(B, T, V, generator=gen, requires_grad=True)
    tok = torch.randint(0, V, (B, T), generator=gen)
    t_lp = torch.randn(M, B, T, V, generator=gen).log_softmax(-1)
    w = torch.rand(M, generator=gen) + 0.1
    rewards = torch.randn(J, B, generator=gen)
    alpha = torch.rand(J, generator=gen)
    lam, gamma, beta = 0.7, 0.9, 0.5

    def pieces(lg):
        lp = lg.log_softmax(-1).gather(-1, tok[..., None]).squeeze(-1)
        lq = t_lp.gather(-1, tok.expand(M, -1, -1)[..., None]).squeeze(-1)
        kl = dense_kl(lg.reshape(B * T, V), t_lp.reshape(M, B * T, V), w, mask.reshape(-1))
        return lp, lq, kl.view(B, T)

    lp, lq, kl = pieces(logits)
    loss, parts = hybrid_loss(
        lp, kl, lq, mask, rewards, reward_weights=alpha, teacher_weights=w,
        gamma=gamma, lam=lam, kl_coef=beta, group_size=G, normalisation=normalisation,
    )  # fmt: skip
    (g_total,) = torch.autograd.grad(loss, logits)

    # The same thing assembled by hand from the definitions.
    lp, lq, kl = pieces(logits)
    c = beta * (w.sum() * lp.detach() - (w[:, None, None] * lq).sum(0)) * mask
    r = alpha @ rewards
    G_t = _naive_returns(c.double(), mask.sum(-1).long(), gamma, r.double(), lam).float()
    b = baseline(-lam * r, G, "loo").offset
    adv = (G_t - b[:, None]) * mask
    n = B if normalisation == "sequence" else mask.sum()
    manual = (beta * (kl * mask).sum() + (lp * adv).sum()) / n
    (g_manual,) = torch.autograd.grad(manual, logits)
    torch.testing.assert_close(g_total, g_manual, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts["loss"], manual.detach(), atol=1e-5, rtol=1e-4)
    assert set(parts) >= {"dense_kl", "sparse_surrogate", "objective", "reward_mean"}


def _group_problem(gen, B=8, T=6, G=4):
    mask = _padded(gen, B, T)[0]
    lp = torch.randn(B, T, generator=gen, dtype=DT).requires_grad_(True)
    kl = torch.rand(B, T, generator=gen, dtype=DT) * mask
    lq = torch.randn(B, T, generator=gen, dtype=DT) * 3
    r = torch.randn(B, generator=gen, dtype=DT)
    return mask, lp, kl, lq, r


def _sparse_grad(lp, kl, lq, mask, r, **kw):
    loss, _ = hybrid_loss(lp, kl, lq, mask, r, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    return g


def test_mean_std_normalises_only_the_reward_part(gen):
    """GRPO's mean/std applies to the reward part −λ r; the future KL costs keep their
    scale. A group whose rewards tie must not multiply the KL part by 1/eps."""
    B, G, lam = 8, 4, 0.7
    mask, lp, kl, lq, r = _group_problem(gen, B=B, G=G)
    r[:G] = r[0]  # the first group's rewards tie
    got = _sparse_grad(lp, kl, lq, mask, r, gamma=1.0, lam=lam, group_size=G,
                       baseline_kind="mean_std")  # fmt: skip
    c = token_costs(lp, lq, None, mask)
    g_cost = future_returns(c, mask, 1.0)
    grp = r.view(-1, G)
    z = (grp - grp.mean(-1, keepdim=True)) / (grp.std(-1, unbiased=False, keepdim=True) + 1e-6)
    adv = (g_cost - lam * z.reshape(B, 1)) * mask
    torch.testing.assert_close(got, adv / B, atol=1e-9, rtol=1e-9)
    assert got[:G].abs().max() < 10 * g_cost.abs().max()  # no 1e6 blow-up


def test_hybrid_loss_ignores_minus_inf_on_padding(gen):
    """A padded position may hold −inf (a log-prob of an impossible pad token) or NaN: the
    loss and its gradient are those of the clean batch."""
    mask, lp, kl, lq, r = _group_problem(gen)
    pad = ~mask.bool()
    assert pad.any()
    kw = dict(gamma=0.8, lam=0.5, group_size=4)
    loss, _ = hybrid_loss(lp, kl, lq, mask, r, **kw)
    (g,) = torch.autograd.grad(loss, lp)
    lp2 = torch.where(pad, float("-inf"), lp.detach()).requires_grad_(True)
    kl2 = torch.where(pad, float("nan"), kl)
    lq2 = torch.where(pad, float("-inf"), lq)
    loss2, parts = hybrid_loss(lp2, kl2, lq2, mask, r, **kw)
    (g2,) = torch.autograd.grad(loss2, lp2)
    assert torch.isfinite(loss2)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(g2, g)
    assert all(torch.isfinite(v) for v in parts.values())


def test_position_baselines_match_their_definitions(gen):
    """loo_position: Ĝ_t^i − mean_{j≠i} Ĝ_t^j; std_position: (Ĝ_t − mean) / (std + eps) over
    the group at each t; Ĝ_t = future costs + (−λ r), −λ r alone after a sample's end."""
    B, T, G, lam = 6, 7, 3, 0.8
    mask, lengths = _padded(gen, B, T)
    g_cost = torch.randn(B, T, generator=gen, dtype=DT) * mask
    r = torch.randn(B, generator=gen, dtype=DT)
    ext = g_cost - lam * r[:, None]
    want_loo = torch.zeros(B, T, dtype=DT)
    want_std = torch.zeros(B, T, dtype=DT)
    for i in range(B):
        grp = range((i // G) * G, (i // G + 1) * G)
        for t in range(int(lengths[i])):
            others = torch.stack([ext[j, t] for j in grp if j != i])
            want_loo[i, t] = ext[i, t] - others.mean()
            col = torch.stack([ext[j, t] for j in grp])
            want_std[i, t] = (ext[i, t] - col.mean()) / (col.std(unbiased=False) + 1e-6)
    got = group_advantages(g_cost, r, mask, G, "loo_position", lam=lam)
    torch.testing.assert_close(got, want_loo)
    torch.testing.assert_close(
        group_advantages(g_cost, r, mask, G, "std_position", lam=lam), want_std
    )
    loo = group_advantages(g_cost, r, mask, G, "loo", lam=lam)
    torch.testing.assert_close(loo, (ext - baseline(-lam * r, G, "loo").offset[:, None]) * mask)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(g_cost, r, mask, 1, "loo_position", lam=lam)
    with pytest.raises(ValueError, match="cost_clip"):
        hybrid_loss(g_cost, g_cost, g_cost, mask, r, cost_clip=0.0)
