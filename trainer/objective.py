"""The hybrid objective: per-token costs, discounted future returns, baselines, the Sparse
REINFORCE surrogate and the hybrid loss (MATH.md, paper eq. 3-12, Theorem 1).

The estimator (MATH.md § Gradient decomposition), for responses y ~ π_θ:

    ∇_θ L = E [ Σ_t  ∇_θ KL_t(s_t)  +  ∇_θ log π_θ(y_t | s_t) · (G_t^γ − b) ]
    c_t     = Σ_m w_m (log π_θ(y_t|s_t) − log q_m(y_t|s_t))                 (token_costs)
    G_t^γ   = Σ_{k=t+1}^{T} γ^(k−t) c_k − λ r,   r = Σ_j α_j r_j     (future_returns; k > t only)

with b a baseline that does not depend on the sample's own response (leave-one-out over the
other samples of its group by default; `group_advantages` lists the kinds, which are
unbiased and which are not, and how each treats the future KL costs). `kl_coef` (β)
scales the KL part of the objective, L = β·KL − λ·E[r]: β = 1 is MATH.md's L, β = 0 is
pure RL (§ Special cases).

Shapes: B sequences (B = number of prompts × G samples per prompt, groups consecutive),
T padded length, M teachers, J rewards. mask [B, T] is 1 on response tokens, 0 on padding.

Normalisation (the same for both terms, so their sum is the gradient of one scalar):
- "sequence" (default): sum over each sequence's tokens, mean over sequences (optionally
  weighted by sequence_weights). This is the one for which E[estimator] = ∇L exactly.
- "token": sum over all tokens divided by the batch's number of response tokens (the DAPO
  "token-mean"). It rescales each batch by 1 / (mean length), a random, length-dependent
  factor, so it is a biased estimate of ∇L; offered because it is common and steadier for
  long, uneven responses.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Normalisation = Literal["sequence", "token"]
BaselineKind = Literal["loo", "loo_position", "mean_std", "std_position", "none"]
# Baselines whose estimator keeps E = ∇L (proved by enumeration in test_theorem1.py).
UNBIASED_BASELINES: tuple[str, ...] = ("loo", "loo_position", "none")


def _teacher_stack(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _teacher_weights(w: torch.Tensor | None, M: int, like: torch.Tensor) -> torch.Tensor:
    if w is None:  # 1/M, as in trainer.ops.dense_kl, so c_t and the Dense KL agree
        return torch.full((M,), 1.0 / M, dtype=like.dtype, device=like.device)
    return w.detach().to(dtype=like.dtype, device=like.device).reshape(M)


def token_costs(
    student_token_logprobs: torch.Tensor,  # [B, T] log π_θ(y_t | s_t)
    teacher_token_logprobs: torch.Tensor,  # [M, B, T] or [B, T] log q_m(y_t | s_t)
    teacher_weights: torch.Tensor | None,  # [M], default 1/M
    mask: torch.Tensor,  # [B, T]
) -> torch.Tensor:
    """c [B, T] = Σ_m w_m (log π − log q_m), 0 on padding. Detached: costs reach the loss
    only through sg(G − b) in the Sparse term (the analytic Dense term takes c_t itself)."""
    lp = student_token_logprobs.detach()
    lq = _teacher_stack(teacher_token_logprobs.detach()).to(lp.dtype)
    w = _teacher_weights(teacher_weights, lq.shape[0], lp)
    c = w.sum() * lp - (w.view(-1, 1, 1) * lq).sum(0)
    return torch.where(mask.bool(), c, 0.0)


def future_returns(
    c: torch.Tensor,  # [B, T] per-token costs (0 on padding)
    mask: torch.Tensor,  # [B, T]
    gamma: float,
    reward: torch.Tensor | None = None,  # [B] combined reward r
    lam: float = 0.0,
) -> torch.Tensor:
    """G [B, T] = Σ_{k=t+1}^{T_b} γ^(k−t) c_k − λ r_b (reward not discounted), 0 on padding.

    Sums over k > t only (the cost c_t of the token itself belongs to the Dense term;
    counting it here, as TRL's MiniLLM does, would count it twice). Vectorised with a
    log-depth doubling scan of S_t = c_t + γ S_{t+1}: log2(T) tensor ops, not T.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    m = mask.to(c.dtype)
    x = torch.where(m != 0, c, 0.0)  # padding may hold anything, even NaN
    T = x.shape[-1]
    s, shift, f = x, 1, float(gamma)
    while shift < T:  # invariant: s_t = Σ_{k=t}^{t+shift-1} γ^(k−t) x_k
        s = s + f * torch.nn.functional.pad(s[:, shift:], (0, shift))
        shift, f = 2 * shift, f * f
    g = gamma * torch.nn.functional.pad(s[:, 1:], (0, 1))
    if reward is not None and lam != 0.0:
        g = g - lam * reward.detach().to(c.dtype).unsqueeze(-1)
    return g * m


def combine_rewards(
    rewards: torch.Tensor,  # [J, B] or [B]
    alphas: torch.Tensor | None = None,  # [J], default all 1
) -> torch.Tensor:
    """r [B] = Σ_j α_j r_j (paper eq. 15)."""
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(0)
    if alphas is None:
        return rewards.sum(0)
    a = alphas.to(dtype=rewards.dtype, device=rewards.device).reshape(-1, 1)
    if a.shape[0] != rewards.shape[0]:
        raise ValueError(f"{rewards.shape[0]} rewards but {a.shape[0]} weights")
    return (a * rewards).sum(0)


class Baseline(NamedTuple):
    """Advantage A = (G − offset) / scale, per sequence: offset [B], scale [B]."""

    offset: torch.Tensor
    scale: torch.Tensor


def baseline(
    values: torch.Tensor,  # [B] per-sequence values, e.g. −λ r
    group_size: int,
    kind: BaselineKind = "loo",
    eps: float = 1e-6,
) -> Baseline:
    """Baseline over groups of `group_size` consecutive sequences (samples of one prompt).

    "loo": offset_i = mean of the other G − 1 values of its group; it does not depend on
        sample i, so the gradient stays unbiased (MATH.md § Variance reduction).
    "mean_std": offset = group mean, scale = group std + eps (GRPO). The mean includes the
        sample itself and the std rescales, so this is biased; an option, not the default.
        (hybrid_loss applies it to the reward part only, through `group_advantages`.)
    "none": offset 0, scale 1.
    """
    B = values.shape[0]
    v = values.detach()
    one = torch.ones_like(v)
    if kind == "none":
        return Baseline(torch.zeros_like(v), one)
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} is not a whole number of groups of {group_size}")
    grouped = v.view(B // group_size, group_size)
    if kind == "loo":
        if group_size < 2:
            raise ValueError("a leave-one-out baseline needs group_size >= 2")
        total = grouped.sum(-1, keepdim=True)
        return Baseline(((total - grouped) / (group_size - 1)).reshape(B), one)
    if kind == "mean_std":
        mean = grouped.mean(-1, keepdim=True).expand_as(grouped).reshape(B)
        std = grouped.std(-1, unbiased=False, keepdim=True).expand_as(grouped).reshape(B)
        return Baseline(mean, std + eps)
    raise ValueError(f"unknown baseline kind {kind!r}")


def advantages(
    returns: torch.Tensor,  # [B, T] G_t^γ
    mask: torch.Tensor,  # [B, T]
    base: Baseline,
) -> torch.Tensor:
    """A [B, T] = (G − offset) / scale on response tokens, 0 on padding; detached."""
    a = (returns.detach() - base.offset.unsqueeze(-1)) / base.scale.unsqueeze(-1)
    return a * mask.to(a.dtype)


def _loo_mean(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B, ...] -> [B, ...]: the mean of the other G − 1 members of each row's group."""
    g = x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])
    return ((g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(x.shape)


def group_advantages(
    cost_returns: torch.Tensor,  # [B, T] Σ_{k>t} γ^(k−t) c_k (the future KL part of G_t)
    reward: torch.Tensor | None,  # [B] combined reward r, or None
    mask: torch.Tensor,  # [B, T]
    group_size: int,
    kind: BaselineKind = "loo",
    lam: float = 0.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """A [B, T], detached, 0 on padding: the Sparse term's weight on ∇log π(y_t|s_t).

    G_t = cost_returns_t − λ r. For a sample that has ended before t its return there is
    taken as −λ r (no future costs), so every sample has a return at every t of the
    padded batch ("extended return" Ĝ); groups are `group_size` consecutive samples.

    Unbiased (the baseline is a function of the *other* samples of the group only, which
    are independent of this sample's trajectory; proved in test_theorem1.py):
      "none"          A = G
      "loo"           A = G − mean_{j≠i} (−λ r_j): the reward part only (the default)
      "loo_position"  A_t = G_t − mean_{j≠i} Ĝ_t^j: the other samples' returns at the same
                      position, future costs included; it also removes the (large) mean
                      of the future-cost sums, which "loo" leaves in (docs/math.md)
    Biased (labelled so; test_theorem1.py shows the difference):
      "mean_std"      A_t = cost_returns_t − λ (r − mean_g r) / (std_g r + eps): GRPO's
                      normalisation of the reward part only (the future costs keep their
                      scale, and tied rewards give a zero reward part, not ×1/eps)
      "std_position"  A_t = (Ĝ_t − mean_g Ĝ_t) / (std_g Ĝ_t + eps) per position, over
                      the group including the sample itself
    """
    m = mask.to(cost_returns.dtype)
    g_cost = torch.where(m != 0, cost_returns.detach(), 0.0)
    r = (
        torch.zeros_like(g_cost[:, 0])
        if reward is None
        else reward.detach().to(g_cost.dtype).reshape(-1)
    )
    v = -lam * r  # [B] reward part of the return
    ext = g_cost + v.unsqueeze(-1)  # [B, T] Ĝ
    B = ext.shape[0]
    if kind == "none":
        return ext * m
    if group_size < 1 or B % group_size:
        raise ValueError(f"batch of {B} is not a whole number of groups of {group_size}")
    if kind in ("loo", "loo_position", "std_position") and group_size < 2:
        raise ValueError(f"baseline {kind!r} needs group_size >= 2")
    if kind == "loo":
        a = ext - _loo_mean(v, group_size).unsqueeze(-1)
    elif kind == "loo_position":
        a = ext - _loo_mean(ext, group_size)
    elif kind == "mean_std":
        grp = r.view(-1, group_size)
        mean = grp.mean(-1, keepdim=True)
        std = grp.std(-1, unbiased=False, keepdim=True)
        z = ((grp - mean) / (std + eps)).reshape(B)
        a = g_cost - lam * z.unsqueeze(-1)
    elif kind == "std_position":
        grp = ext.view(-1, group_size, ext.shape[-1])
        mean = grp.mean(1, keepdim=True)
        std = grp.std(1, unbiased=False, keepdim=True)
        a = ((grp - mean) / (std + eps)).reshape(ext.shape)
    else:
        raise ValueError(f"unknown baseline kind {kind!r}")
    return a * m


def normalise(
    x: torch.Tensor,  # [B, T] per-token quantity, 0 on padding
    mask: torch.Tensor,  # [B, T]
    normalisation: Normalisation = "sequence",
    sequence_weights: torch.Tensor | None = None,  # [B], default 1 (a plain mean)
) -> torch.Tensor:
    """Scalar: Σ_b w_b Σ_t x_bt / Σ_b w_b ("sequence") or / Σ_b w_b n_b ("token")."""
    m = mask.to(x.dtype)
    w = torch.ones_like(x[:, 0]) if sequence_weights is None else sequence_weights.to(x.dtype)
    # where, not x * m: padding may hold ±inf or NaN (e.g. log π of a pad token), and
    # inf · 0 = NaN would poison the sum and its gradient.
    num = (w * torch.where(m != 0, x, 0.0).sum(-1)).sum()
    if normalisation == "sequence":
        return num / w.sum()
    if normalisation == "token":
        return num / (w * m.sum(-1)).sum().clamp_min(1.0)
    raise ValueError(f"normalisation must be 'sequence' or 'token', got {normalisation!r}")


def sparse_surrogate(
    student_token_logprobs: torch.Tensor,  # [B, T] log π_θ(y_t | s_t), differentiable
    advantages: torch.Tensor,  # [B, T] G − b (treated as a constant)
    mask: torch.Tensor,  # [B, T]
    normalisation: Normalisation = "sequence",
    sequence_weights: torch.Tensor | None = None,  # [B]
) -> torch.Tensor:
    """Scalar whose gradient is normalise(∇ log π(y_t|s_t) · sg(A_t)). Its value is not a
    loss to read (it is the REINFORCE surrogate); minimise it together with the Dense term."""
    keep = mask.to(torch.bool)
    lp = torch.where(keep, student_token_logprobs, 0.0)  # padding may be −inf (see normalise)
    x = lp * torch.where(keep, advantages.detach(), 0.0)
    return normalise(x, mask, normalisation, sequence_weights)


def hybrid_loss(
    student_token_logprobs: torch.Tensor,  # [B, T] log π_θ(y_t|s_t), differentiable
    dense_kl_per_token: torch.Tensor,  # [B, T] Σ_m w_m KL_t, differentiable (trainer.ops)
    teacher_token_logprobs: torch.Tensor,  # [M, B, T] or [B, T] log q_m(y_t|s_t)
    mask: torch.Tensor,  # [B, T]
    rewards: torch.Tensor | None = None,  # [J, B] or [B]
    *,
    reward_weights: torch.Tensor | None = None,  # [J] α_j, default 1
    teacher_weights: torch.Tensor | None = None,  # [M] w_m, default 1/M (as in dense_kl)
    gamma: float = 1.0,
    lam: float = 0.0,
    kl_coef: float = 1.0,
    group_size: int = 1,
    baseline_kind: BaselineKind = "loo",
    normalisation: Normalisation = "sequence",
    sequence_weights: torch.Tensor | None = None,  # [B]
    cost_clip: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = β·normalise(KL_t) + normalise(log π(y_t) · sg(G_t^γ − b)), with β = kl_coef.

    Its gradient is the Dense + Sparse estimator of ∇(β·KL − λ·E[r]) (module docstring).
    dense_kl_per_token must be computed with the same teacher weights (row weights = mask).
    With group_size = 1 there is no group to form a baseline from, and "none" is used.
    baseline_kind: see `group_advantages` (which kinds are unbiased, which are not).
    cost_clip: when set, each c_t is clipped to [−cost_clip, cost_clip] inside the future
    returns only (the Dense term and the logged objective are untouched). This bounds the
    variance of the future-cost sums but changes the estimator: biased unless no |c_t|
    exceeds the clip (test_theorem1.py shows both).
    Returns (loss, parts): parts are detached scalars for logging.
    """
    if cost_clip is not None and not cost_clip > 0:
        raise ValueError(f"cost_clip must be > 0 (or None), got {cost_clip}")
    m = mask.to(student_token_logprobs.dtype)
    r = None if rewards is None else combine_rewards(rewards, reward_weights)
    c = kl_coef * token_costs(student_token_logprobs, teacher_token_logprobs, teacher_weights, m)
    c_ret = c if cost_clip is None else c.clamp(-cost_clip, cost_clip)
    g_cost = future_returns(c_ret, m, gamma)  # the future-KL part of G_t
    kind: BaselineKind = "none" if group_size < 2 else baseline_kind
    reward_term = torch.zeros_like(m[:, 0]) if r is None else -lam * r.detach().to(m.dtype)
    g = (g_cost + reward_term.unsqueeze(-1)) * m  # G_t^γ
    adv = group_advantages(g_cost, r, m, group_size, kind, lam=lam)

    dense = normalise(dense_kl_per_token, m, normalisation, sequence_weights)
    sparse = sparse_surrogate(student_token_logprobs, adv, m, normalisation, sequence_weights)
    loss = kl_coef * dense + sparse
    with torch.no_grad():
        parts = {
            "loss": loss.detach(),
            "dense_kl": dense.detach(),
            "sparse_surrogate": sparse.detach(),
            # Monte Carlo estimate of L = E[β Σ_t c_t − λ r] (per sequence, always).
            "objective": normalise(c, m, "sequence", sequence_weights)
            + normalise(
                reward_term.unsqueeze(-1), torch.ones_like(m[:, :1]), "sequence", sequence_weights
            ),
            "cost_mean": normalise(c, m, "token", sequence_weights),
            "return_mean": normalise(g, m, "token", sequence_weights),
            "advantage_mean": normalise(adv, m, "token", sequence_weights),
            "reward_mean": torch.zeros(()) if r is None else r.detach().float().mean(),
        }
    return loss, parts
