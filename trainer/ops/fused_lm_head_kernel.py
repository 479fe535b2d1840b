"""Triton walks over the vocabulary for the fused LM-head op (maths in fused_lm_head.py).

Same interface and maths as fused_lm_head_reference.py; the difference is what a chunk of
C vocabulary columns costs. Each chunk's logits z_c = h W_cᵀ + b_c [N, C] come from one
cuBLAS matmul (torch.matmul, as in Liger's fused linear losses: the matmuls are where the
flops are, and cuBLAS runs them at peak), and everything elementwise on the chunk is one
Triton kernel that reads it once:

- forward, `_lse_gather_kernel`: per row, the online max mx and Σ e^{z−mx} updated over
  the chunk, and z at the ids (support and sampled token) that fall in it;
- backward, `_grad_chunk_kernel`: per row, the chunk overwritten in place by its logit
  gradient G = c_n · e^{z − lse} plus the point masses a_ns at ids_ns (support first, then
  the sampled token, which may coincide with a support id), then dh += G W_c,
  dW_c = Gᵀ h and db_c = Σ_n G by cuBLAS again.

Extra memory is one [N, C] chunk (in the input dtype) plus O(N·K); dh accumulates in
fp32. Offsets are int64 (N·C exceeds 2^31 at large chunks), accumulation fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Vocabulary columns per chunk: N·C elements of scratch; 16,384 keeps N = 8192 at 256 MiB
# in bf16 while each matmul stays large enough for cuBLAS.
DEFAULT_CHUNK = 16384
_BLOCK = 4096  # columns per step inside a row program


@triton.jit
def _lse_gather_kernel(
    z_ptr,  # [N, C] logits of this chunk (input dtype), row stride stride_z
    stride_z,
    mx_ptr,  # [N] fp32 in/out: running max over the chunks so far
    s_ptr,  # [N] fp32 in/out: running Σ e^{z − mx}
    ids_ptr,  # [N, S] int64 ids to pick out (-1 = none), contiguous
    zg_ptr,  # [N, S] fp32 in/out: z at those ids, written when the id is in this chunk
    v0,  # first vocabulary column of the chunk
    C,  # columns in the chunk
    S,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row = z_ptr + n * stride_z
    mx = tl.load(mx_ptr + n)
    s = tl.load(s_ptr + n)
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z = tl.load(row + offs, mask=offs < C, other=float("-inf")).to(tl.float32)
        mx_new = tl.maximum(mx, tl.max(z, axis=0))
        s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(z - mx_new), axis=0)
        mx = mx_new
    tl.store(mx_ptr + n, mx)
    tl.store(s_ptr + n, s)
    k = tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + n * S + k, mask=k < S, other=-1)
    local = ids - v0
    hit = (k < S) & (ids >= 0) & (local >= 0) & (local < C)
    zv = tl.load(row + tl.where(hit, local, 0), mask=hit, other=0.0).to(tl.float32)
    tl.store(zg_ptr + n * S + k, zv, mask=hit)


@triton.jit
def _grad_chunk_kernel(
    z_ptr,  # [N, C] in: logits of this chunk; out: their gradient G (same dtype), in place
    stride_z,
    lse_ptr,  # [N] fp32 logsumexp of each row
    dense_ptr,  # [N] fp32 c_n: G = c_n p + point masses
    ids_ptr,  # [N, S] int64, -1 = none; slots 0..S-2 unique per row, slot S-1 = sampled id
    point_ptr,  # [N, S] fp32 a_ns: the point mass at ids_ns
    v0,
    C,
    S,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    row = z_ptr + n * stride_z
    lse = tl.load(lse_ptr + n)
    c = tl.load(dense_ptr + n)
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < C
        z = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(row + offs, (c * tl.exp(z - lse)).to(z_ptr.dtype.element_ty), mask=mask)
    # The point masses read what the loop above wrote (other threads' lanes): order them.
    tl.debug_barrier()
    k = tl.arange(0, BLOCK_S)
    ids = tl.load(ids_ptr + n * S + k, mask=k < S - 1, other=-1)
    local = ids - v0
    hit = (k < S - 1) & (ids >= 0) & (local >= 0) & (local < C)
    a = tl.load(point_ptr + n * S + k, mask=hit, other=0.0)
    at = row + tl.where(hit, local, 0)
    g = tl.load(at, mask=hit, other=0.0).to(tl.float32)
    tl.store(at, (g + a).to(z_ptr.dtype.element_ty), mask=hit)
    tl.debug_barrier()
    # The sampled id last: it may equal a support id, and then both masses add up.
    y = tl.load(ids_ptr + n * S + S - 1)
    ly = y - v0
    if (y >= 0) & (ly >= 0) & (ly < C):
        g = tl.load(row + ly).to(tl.float32) + tl.load(point_ptr + n * S + S - 1)
        tl.store(row + ly, g.to(z_ptr.dtype.element_ty))


def _chunk_logits(h, weight, bias, v0: int, v1: int) -> torch.Tensor:
    z = h @ weight[v0:v1].T  # [N, C] in the input dtype
    return z if bias is None else z.add_(bias[v0:v1])


def _block_s(S: int) -> int:
    return triton.next_power_of_2(max(S, 2))


def lse_and_gather(
    h: torch.Tensor,  # [N, d]
    weight: torch.Tensor,  # [V, d]
    bias: torch.Tensor | None,  # [V]
    ids: torch.Tensor,  # [N, S] int64, -1 = none
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [N] fp32, z at ids [N, S] fp32, 0 at -1)."""
    N, V = h.shape[0], weight.shape[0]
    S = ids.shape[1]
    ids = ids.contiguous()
    mx = torch.full((N,), -1.0e30, dtype=torch.float32, device=h.device)
    s = torch.zeros(N, dtype=torch.float32, device=h.device)
    zg = torch.zeros((N, S), dtype=torch.float32, device=h.device)
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        z = _chunk_logits(h, weight, bias, v0, v1)
        _lse_gather_kernel[(N,)](
            z, z.stride(0), mx, s, ids, zg, v0, v1 - v0, S,
            BLOCK=min(_BLOCK, triton.next_power_of_2(v1 - v0)), BLOCK_S=_block_s(S),
        )  # fmt: skip
        del z
    return mx + s.log(), zg


def lm_head_backward(
    h: torch.Tensor,  # [N, d]
    weight: torch.Tensor,  # [V, d]
    bias: torch.Tensor | None,  # [V]
    lse: torch.Tensor,  # [N] fp32
    ids: torch.Tensor,  # [N, S] int64; slots 0..S-2 unique per row, slot S-1 the sampled id
    point: torch.Tensor,  # [N, S] a_ns
    dense: torch.Tensor,  # [N] c_n
    need_h: bool = True,
    need_w: bool = True,
    need_b: bool = True,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dh [N, d], dW [V, d], db [V]) in the dtypes of h, W and b, or None where not needed."""
    N, V = h.shape[0], weight.shape[0]
    S = ids.shape[1]
    ids = ids.contiguous()
    point = point.to(torch.float32).contiguous()
    dense = dense.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty_like(bias) if need_b and bias is not None else None
    for v0 in range(0, V, chunk):
        v1 = min(V, v0 + chunk)
        g = _chunk_logits(h, weight, bias, v0, v1)
        _grad_chunk_kernel[(N,)](
            g, g.stride(0), lse, dense, ids, point, v0, v1 - v0, S,
            BLOCK=min(_BLOCK, triton.next_power_of_2(v1 - v0)), BLOCK_S=_block_s(S),
        )  # fmt: skip
        if dh is not None:
            dh += g @ weight[v0:v1]
        if dw is not None:
            torch.mm(g.T, h, out=dw[v0:v1])
        if db is not None:
            db[v0:v1] = g.sum(0, dtype=torch.float32).to(db.dtype)
        del g
    return (None if dh is None else dh.to(h.dtype)), dw, db
