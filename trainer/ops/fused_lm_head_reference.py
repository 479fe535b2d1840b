"""Chunked pure-torch walks over the vocabulary for the fused LM-head op (fused_lm_head.py).

The fused op never holds the student's [N, V] logits z = h Wᵀ + b. Everything it needs
from V is two walks over V in chunks of C columns:

- forward (`lse_and_gather`): the online logsumexp of each row, and z at a few ids per
  row (the top-K support and the sampled token), picked out of the chunk that holds them;
- backward (`lm_head_backward`): the logit gradient of each chunk, recomputed as

      G[n, j] = c_n · p_nj + Σ_s a_ns · 1[j = ids_ns],     p = exp(z − lse)

  (a dense coefficient times p plus at most K + 1 point masses per row, which is the
  form of every gradient the op has), then dh += G W_c, dW_c = Gᵀ h, db_c = Σ_n G.

Extra memory is O(N·C) for the chunk (a few copies) and O(N·K) for the gathered ids;
dW and db are the parameter gradients themselves. This is the CPU fallback and, on
float64 inputs, the float64 oracle of the Triton kernels in fused_lm_head_kernel.py.
"""

from __future__ import annotations

import torch

# Columns per chunk: large enough that each chunk is a good matmul on a CPU, small
# enough that N·C floats stay far below N·V (V/C = 37 at V = 151,936): at N = 2048 a
# chunk is 32 MiB in fp32, next to the 519 MiB of dW that any method returns.
DEFAULT_CHUNK = 4096


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (the oracle), float32 otherwise."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


def _chunk_logits(
    h: torch.Tensor,  # [N, d]
    weight: torch.Tensor,  # [V, d]
    bias: torch.Tensor | None,  # [V]
    v0: int,
    v1: int,
    cdt: torch.dtype,
) -> torch.Tensor:
    """z[:, v0:v1] in the compute dtype, [N, C]. The matmul runs in the input dtype, as the
    model's LM head would (a bf16 head gives bf16 logits)."""
    w = weight[v0:v1].T
    z = h @ w if bias is None else torch.addmm(bias[v0:v1], h, w)  # bias in the matmul
    return z.to(cdt)


def _in_chunk(ids: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column of each id inside the chunk clamped to it [N, S], whether it is in it)."""
    local = ids - v0
    inside = (local >= 0) & (ids < v1)
    return local.clamp(0, v1 - v0 - 1), inside


def lse_and_gather(
    h: torch.Tensor,  # [N, d]
    weight: torch.Tensor,  # [V, d]
    bias: torch.Tensor | None,  # [V]
    ids: torch.Tensor,  # [N, S] int64, -1 = none
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [N], z at ids [N, S] (0 at -1)), both in the compute dtype."""
    cdt = compute_dtype(h)
    N, V = h.shape[0], weight.shape[0]
    lse = torch.full((N,), float("-inf"), dtype=cdt, device=h.device)
    zg = torch.zeros(ids.shape, dtype=cdt, device=h.device)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        z = _chunk_logits(h, weight, bias, v0, v1, cdt)
        # The online logsumexp, one chunk at a time: lse ← log(e^lse + Σ_chunk e^z).
        lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        local, inside = _in_chunk(ids, v0, v1)
        zg = torch.where(inside, z.gather(1, local), zg)
        del z
    return lse, zg


def lm_head_backward(
    h: torch.Tensor,  # [N, d]
    weight: torch.Tensor,  # [V, d]
    bias: torch.Tensor | None,  # [V]
    lse: torch.Tensor,  # [N] compute dtype
    ids: torch.Tensor,  # [N, S] int64, -1 = none
    point: torch.Tensor,  # [N, S] a_ns, the point mass at ids_ns (compute dtype)
    dense: torch.Tensor,  # [N] c_n, the coefficient of p (compute dtype)
    need_h: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dh [N, d], dW [V, d], db [V]) in the dtypes of h, W and b, or None where not needed."""
    cdt = compute_dtype(h)
    V = weight.shape[0]
    dh = torch.zeros(h.shape, dtype=cdt, device=h.device) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty_like(bias) if need_b and bias is not None else None
    point = torch.where(ids >= 0, point, 0.0)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        g = _chunk_logits(h, weight, bias, v0, v1, cdt)
        g = g.sub_(lse.unsqueeze(-1)).exp_().mul_(dense.unsqueeze(-1))  # c_n p, in place
        local, inside = _in_chunk(ids, v0, v1)
        # Ids outside the chunk add 0 at a clamped column; duplicates would add up.
        g.scatter_add_(1, local, torch.where(inside, point, 0.0))
        gm = g.to(weight.dtype)  # the matmuls run in the input dtype, like autograd's
        if dh is not None:
            if gm.dtype == cdt:
                dh.addmm_(gm, weight[v0:v1])  # in place, no [N, d] temporary
            else:
                dh += (gm @ weight[v0:v1]).to(cdt)
        if dw is not None:
            torch.mm(gm.T, h, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = g.sum(0).to(db.dtype)
        del g, gm
    return (None if dh is None else dh.to(h.dtype)), dw, db
