"""Bad input to the Dense ops: precise errors, never an out-of-bounds read or a silent
broadcast; repeated support ids count once; masked rows are never read by the fill rule.

Each test runs the Triton path (interpreter on CPU, compiled on CUDA) and the torch path.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.ops.helpers import DEVICE
from trainer.ops import build_support, dense_kl, topk_kl
from trainer.ops.topk_kl_kernel import topk_kl_triton

BACKENDS = ["triton", "torch"]
MODES = ["sparse", "exact", "renorm"]


def _dev(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _topk_problem(gen, N=5, V=97, K=6, M=1):
    z = torch.randn(N, V, generator=gen) * 2
    ids = build_support("student", K, z)
    t_lp = torch.randn(M, N, V, generator=gen).log_softmax(-1)
    lq = t_lp.gather(-1, ids.expand(M, -1, -1))
    return z, ids, lq, t_lp


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", ["V", "V+40", "-2"])
def test_support_ids_out_of_range_raise(gen, backend, bad):
    """An id ≥ V (even V itself, which lands in the next row's memory) or < −1 raises a
    ValueError naming support_ids and the bound, instead of reading out of bounds."""
    z, ids, lq, _ = _topk_problem(gen)
    V = z.shape[1]
    ids = ids.clone()
    ids[2, 3] = {"V": V, "V+40": V + 40, "-2": -2}[bad]
    d = _dev(backend)
    with pytest.raises(ValueError, match=rf"support_ids must lie in \[-1, {V - 1}\]"):
        topk_kl(z.to(d), ids.to(d), lq.to(d), backend=backend)
    if backend == "triton":  # the kernel's own entry point checks too
        with pytest.raises(ValueError, match="support_ids"):
            topk_kl_triton(z.to(d), ids.to(d), lq.to(d))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("delta", [-1, 1])
def test_topk_row_weights_of_wrong_length_raise(gen, backend, delta):
    z, ids, lq, _ = _topk_problem(gen)
    N = z.shape[0]
    d = _dev(backend)
    rho = torch.ones(N + delta, device=d)
    with pytest.raises(ValueError, match=rf"row_weights must be \[{N}\]"):
        topk_kl(z.to(d), ids.to(d), lq.to(d), None, None, rho, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ["[1, V]", "[M, 1, V]", "[N, 1]"])
def test_dense_teacher_of_wrong_shape_raises(gen, backend, shape):
    """A teacher that would broadcast against [N, V] is refused, naming the wanted shape."""
    N, V, M = 4, 33, 2
    z = torch.randn(N, V, generator=gen)
    t = {
        "[1, V]": torch.randn(1, V, generator=gen),
        "[M, 1, V]": torch.randn(M, 1, V, generator=gen),
        "[N, 1]": torch.randn(N, 1, generator=gen),
    }[shape].log_softmax(-1)
    d = _dev(backend)
    with pytest.raises(ValueError, match=rf"teacher must be \[M, {N}, {V}\]"):
        dense_kl(z.to(d), t.to(d), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_repeated_support_ids_count_once(gen, backend, mode):
    """A row listing an id twice behaves exactly as the row listing it once (the repeat
    becomes padding): same kl, P_S, tail and gradient. P_S stays ≤ 1."""
    z, ids, _lq, t_lp = _topk_problem(gen, K=6)
    dup = ids.clone()
    dup[:, 4] = dup[:, 1]  # every row repeats its slot-1 id (mass counted twice before)
    dup[0, 5] = dup[0, 1]  # row 0 three times
    once = torch.where(torch.arange(6) == 4, -1, dup)
    once[0, 5] = -1
    lq_dup = t_lp.gather(-1, dup.clamp_min(0).unsqueeze(0))
    d = _dev(backend)
    go = torch.randn(z.shape[0], generator=gen).to(d)
    out = []
    for s in (dup, once):
        zz = z.clone().to(d).requires_grad_(True)
        res = topk_kl(zz, s.to(d), lq_dup.to(d), mode=mode, backend=backend)
        res.kl.backward(go)
        out.append(([x.detach().cpu() for x in res], zz.grad.cpu()))
    (got, g_got), (want, g_want) = out
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_got, g_want, atol=1e-7, rtol=1e-6)
    assert (got[1] <= 1 + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_teacher_on_masked_row_is_not_read(gen, backend):
    """A masked row (row weight 0) may hold NaN teacher values and no leftover mass: the
    fill rule does not see it missing, and the row gives zeros."""
    z, ids, lq, _ = _topk_problem(gen)
    rho = torch.ones(z.shape[0])
    rho[1] = rho[3] = 0.0
    lq = lq.clone()
    lq[:, 1] = float("nan")
    lq[:, 3, 2] = float("nan")
    z[1] = float("nan")  # padding garbage in the logits too
    d = _dev(backend)
    zz = z.to(d).requires_grad_(True)
    res = topk_kl(zz, ids.to(d), lq.to(d), None, None, rho.to(d), backend=backend)
    res.kl.sum().backward()
    for x in res:
        assert torch.isfinite(x).all() and (x.detach()[rho.to(d) == 0] == 0).all()
    assert torch.isfinite(zz.grad).all() and (zz.grad[rho.to(d) == 0] == 0).all()
    # A NaN on a live row is still a missing entry that needs the leftover mass.
    lq[:, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="leftover"):
        topk_kl(zz, ids.to(d), lq.to(d), None, None, rho.to(d), backend=backend)
