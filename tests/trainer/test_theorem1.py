"""Exact proof of Theorem 1 (MATH.md, last section) on a tiny tabular policy, in float64.

Vocabulary {0, 1, 2} with 0 = end-of-sequence, at most T = 3 tokens: 15 responses of
lengths 1-3, so padding and variable lengths are exercised. The student is a table of
logits per context (7 contexts), two teachers with weights w_m, two rewards with weights
α_j. L(θ) = Σ_y P_θ(y) [β Σ_t c_t − λ r(y)] is an exact finite sum, autograd gives ∇L, and
the expectation of the Dense + Sparse estimator is the same batch of all 15 responses
weighted by their probabilities (hybrid_loss's sequence_weights). Fresh random tables in
every test.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

from trainer.objective import UNBIASED_BASELINES, hybrid_loss
from trainer.ops import dense_kl

V, T, EOS, M, J = 3, 3, 0, 2, 2
DT = torch.float64


def _contexts() -> list[tuple[int, ...]]:
    """Every prefix that can be continued: no EOS inside, shorter than T."""
    out: list[tuple[int, ...]] = [()]
    for n in range(1, T):
        out += list(itertools.product(range(1, V), repeat=n))
    return out


def _responses() -> list[tuple[int, ...]]:
    out = []
    for n in range(1, T + 1):
        for ys in itertools.product(range(V), repeat=n):
            if EOS not in ys[:-1] and (n == T or ys[-1] == EOS):
                out.append(ys)
    return out


CTX = {c: i for i, c in enumerate(_contexts())}
RESP = _responses()


@dataclass
class Problem:
    theta: torch.Tensor  # [C, V] student logits per context, requires grad
    teacher: torch.Tensor  # [M, C, V] teacher log-probs per context
    w: torch.Tensor  # [M]
    rewards: torch.Tensor  # [J, R] per response
    alpha: torch.Tensor  # [J]


def _problem(seed: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    C = len(CTX)
    theta = (torch.randn(C, V, generator=g, dtype=DT) * 1.5).requires_grad_(True)
    teacher = (torch.randn(M, C, V, generator=g, dtype=DT) * 1.5).log_softmax(-1)
    return Problem(
        theta=theta,
        teacher=teacher,
        w=torch.rand(M, generator=g, dtype=DT) + 0.2,
        rewards=torch.randn(J, len(RESP), generator=g, dtype=DT),
        alpha=torch.rand(J, generator=g, dtype=DT) + 0.1,
    )


def _batch(resps: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens [B, T], context ids [B, T], mask [B, T] (padding uses context 0, token 0)."""
    B = len(resps)
    tok = torch.zeros(B, T, dtype=torch.int64)
    ctx = torch.zeros(B, T, dtype=torch.int64)
    mask = torch.zeros(B, T, dtype=DT)
    for b, ys in enumerate(resps):
        for t, y in enumerate(ys):
            tok[b, t], ctx[b, t], mask[b, t] = y, CTX[ys[:t]], 1.0
    return tok, ctx, mask


def _seq_logprob(pb: Problem, resps: list[tuple[int, ...]]) -> torch.Tensor:
    tok, ctx, mask = _batch(resps)
    lp = pb.theta.log_softmax(-1)[ctx].gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(-1)


def exact_objective(pb: Problem, lam: float, kl_coef: float = 1.0) -> torch.Tensor:
    """L(θ) = Σ_y P(y) [β Σ_t Σ_m w_m (log π − log q_m)(y_t|s_t) − λ Σ_j α_j r_j(y)]."""
    tok, ctx, mask = _batch(RESP)
    lp = pb.theta.log_softmax(-1)[ctx].gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    lq = pb.teacher[:, ctx].gather(-1, tok.expand(M, -1, -1).unsqueeze(-1)).squeeze(-1)
    cost = ((pb.w.sum() * lp - (pb.w.view(M, 1, 1) * lq).sum(0)) * mask).sum(-1)
    r = (pb.alpha.unsqueeze(-1) * pb.rewards).sum(0)
    prob = (lp * mask).sum(-1).exp()
    return (prob * (kl_coef * cost - lam * r)).sum()


def expected_estimator(
    pb: Problem,
    gamma: float,
    lam: float,
    kl_coef: float = 1.0,
    group_size: int = 1,
    baseline_kind: str = "loo",
    cost_clip: float | None = None,
) -> torch.Tensor:
    """E[∇ hybrid_loss] by enumeration: groups of `group_size` i.i.d. responses, every
    combination weighted by its probability."""
    idx = list(itertools.product(range(len(RESP)), repeat=group_size))
    flat = [i for combo in idx for i in combo]
    resps = [RESP[i] for i in flat]
    tok, ctx, mask = _batch(resps)
    B = len(resps)
    with torch.no_grad():
        p_resp = _seq_logprob(pb, RESP).exp()
        w_combo = torch.stack([p_resp[list(c)].prod() for c in idx])
        seq_w = w_combo.repeat_interleave(group_size)

    logits = pb.theta[ctx]  # [B, T, V]
    lp = logits.log_softmax(-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)  # [B, T]
    teacher_rows = pb.teacher[:, ctx]  # [M, B, T, V]
    lq_tok = teacher_rows.gather(-1, tok.expand(M, -1, -1).unsqueeze(-1)).squeeze(-1)
    kl = dense_kl(
        logits.reshape(B * T, V),
        teacher_rows.reshape(M, B * T, V),
        teacher_weights=pb.w,
        row_weights=mask.reshape(-1),
    ).view(B, T)
    rewards = pb.rewards[:, flat]  # [J, B]
    loss, _ = hybrid_loss(
        lp,
        kl,
        lq_tok,
        mask,
        rewards,
        reward_weights=pb.alpha,
        teacher_weights=pb.w,
        gamma=gamma,
        lam=lam,
        kl_coef=kl_coef,
        group_size=group_size,
        baseline_kind=baseline_kind,  # type: ignore[arg-type]
        sequence_weights=seq_w,
        cost_clip=cost_clip,
    )
    (grad,) = torch.autograd.grad(loss, pb.theta)
    return grad


def grad_of(f: torch.Tensor, pb: Problem) -> torch.Tensor:
    (g,) = torch.autograd.grad(f, pb.theta)
    return g


def dense_only_expectation(pb: Problem) -> torch.Tensor:
    """Σ_t E[∇ KL_t(s_t)] computed independently: Σ_s d(s) ∇ Σ_m w_m KL(π(·|s) ‖ q_m(·|s)),
    d(s) the (detached) probability of reaching context s."""
    with torch.no_grad():
        pi = pb.theta.softmax(-1)
        d = torch.zeros(len(CTX), dtype=DT)
        for c, i in CTX.items():
            d[i] = 1.0
            for t in range(len(c)):
                d[i] *= pi[CTX[c[:t]], c[t]]
    logp = pb.theta.log_softmax(-1)
    kl = (logp.exp().unsqueeze(0) * (logp.unsqueeze(0) - pb.teacher)).sum(-1)  # [M, C]
    return grad_of((d * (pb.w.unsqueeze(-1) * kl).sum(0)).sum(), pb)


def expected_reward_grad(pb: Problem) -> torch.Tensor:
    r = (pb.alpha.unsqueeze(-1) * pb.rewards).sum(0)
    return grad_of((_seq_logprob(pb, RESP).exp() * r).sum(), pb)


@pytest.fixture
def pb() -> Problem:
    return _problem(random.randrange(2**31))


@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_gamma_one_is_unbiased(pb: Problem, lam: float) -> None:
    est = expected_estimator(pb, gamma=1.0, lam=lam)
    exact = grad_of(exact_objective(pb, lam), pb)
    assert exact.abs().max() > 1e-3  # a non-trivial gradient
    torch.testing.assert_close(est, exact, rtol=0, atol=1e-10)


def test_gamma_below_one_is_biased(pb: Problem) -> None:
    exact = grad_of(exact_objective(pb, 0.5), pb)
    for gamma in (0.0, 0.5, 0.9):
        est = expected_estimator(pb, gamma=gamma, lam=0.5)
        assert (est - exact).abs().max() > 1e-4, gamma


def test_on_policy_distillation_is_dense_only(pb: Problem) -> None:
    """γ = 0, λ = 0: the estimator is Σ_t E[∇KL_t], which is not ∇L (state distribution)."""
    est = expected_estimator(pb, gamma=0.0, lam=0.0)
    torch.testing.assert_close(est, dense_only_expectation(pb), rtol=0, atol=1e-10)
    assert (est - grad_of(exact_objective(pb, 0.0), pb)).abs().max() > 1e-4


def test_on_policy_distillation_plus_reward(pb: Problem) -> None:
    """γ = 0, λ > 0: Dense + reward through Sparse = Σ_t E[∇KL_t] − λ ∇E[r]."""
    lam = 1.3
    est = expected_estimator(pb, gamma=0.0, lam=lam)
    want = dense_only_expectation(pb) - lam * expected_reward_grad(pb)
    torch.testing.assert_close(est, want, rtol=0, atol=1e-10)


def test_pure_rl(pb: Problem) -> None:
    """Dense weight 0 (kl_coef = 0): Sparse only, the REINFORCE gradient −λ ∇E[r]."""
    lam = 0.8
    for gamma in (0.0, 1.0):
        est = expected_estimator(pb, gamma=gamma, lam=lam, kl_coef=0.0)
        want = -lam * expected_reward_grad(pb)
        torch.testing.assert_close(est, want, rtol=0, atol=1e-10)
        torch.testing.assert_close(
            want, grad_of(exact_objective(pb, lam, kl_coef=0.0), pb), rtol=0, atol=1e-10
        )


def test_kl_coef_scales_the_kl_part(pb: Problem) -> None:
    est = expected_estimator(pb, gamma=1.0, lam=0.4, kl_coef=0.3)
    exact = grad_of(exact_objective(pb, 0.4, kl_coef=0.3), pb)
    torch.testing.assert_close(est, exact, rtol=0, atol=1e-10)


def test_leave_one_out_baseline_keeps_it_unbiased(pb: Problem) -> None:
    """Groups of G = 2 i.i.d. responses (all 225 pairs): the LOO baseline leaves E = ∇L."""
    lam = 0.9
    exact = grad_of(exact_objective(pb, lam), pb)
    est = expected_estimator(pb, gamma=1.0, lam=lam, group_size=2, baseline_kind="loo")
    torch.testing.assert_close(est, exact, rtol=0, atol=1e-10)
    biased = expected_estimator(pb, gamma=1.0, lam=lam, group_size=2, baseline_kind="mean_std")
    assert (biased - exact).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["loo", "loo_position", "none"])
@pytest.mark.parametrize("gamma", [1.0, 0.6])
def test_unbiased_baselines_keep_the_expectation(pb: Problem, kind: str, gamma: float) -> None:
    """Groups of G = 2 (all 225 pairs), responses of different lengths: a baseline built
    only from the *other* sample (its reward, or its whole return at the same position,
    future KL costs included) leaves E[estimator] unchanged: = ∇L at γ = 1, and = the
    no-baseline expectation at γ < 1."""
    assert kind in UNBIASED_BASELINES
    lam = 0.9
    want = (
        grad_of(exact_objective(pb, lam), pb)
        if gamma == 1.0
        else expected_estimator(pb, gamma=gamma, lam=lam)
    )
    est = expected_estimator(pb, gamma=gamma, lam=lam, group_size=2, baseline_kind=kind)
    torch.testing.assert_close(est, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["mean_std", "std_position"])
def test_biased_baselines_are_biased(pb: Problem, kind: str) -> None:
    """GRPO's mean/std of the reward part, and returns standardised per position, change
    the expectation (they use the sample itself and rescale): labelled biased."""
    assert kind not in UNBIASED_BASELINES
    lam = 0.9
    exact = grad_of(exact_objective(pb, lam), pb)
    est = expected_estimator(pb, gamma=1.0, lam=lam, group_size=2, baseline_kind=kind)
    assert (est - exact).abs().max() > 1e-4


def test_cost_clip_is_biased_unless_nothing_is_clipped(pb: Problem) -> None:
    """Clipping c_t in the future returns bounds their variance but is biased; a clip
    above every |c_t| changes nothing."""
    lam = 0.9
    exact = grad_of(exact_objective(pb, lam), pb)
    with torch.no_grad():
        lp = pb.theta.log_softmax(-1)
        c_max = float((pb.w.sum() * lp - (pb.w.view(M, 1, 1) * pb.teacher).sum(0)).abs().max())
    loose = expected_estimator(pb, gamma=1.0, lam=lam, group_size=2, baseline_kind="loo_position",
                               cost_clip=c_max + 1.0)  # fmt: skip
    torch.testing.assert_close(loose, exact, rtol=0, atol=1e-10)
    tight = expected_estimator(pb, gamma=1.0, lam=lam, group_size=2, baseline_kind="loo_position",
                               cost_clip=0.25 * c_max)  # fmt: skip
    assert (tight - exact).abs().max() > 1e-4
