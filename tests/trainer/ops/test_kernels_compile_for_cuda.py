"""The Dense kernels compile for an H100 (sm_90) without a GPU.

The CPU tests run the kernels under the Triton interpreter, which executes Python and
never type-checks what the compiler would (a variable typed differently in the two
branches of an `if`, a loop-carried scalar changing type, an unsupported op). This test
compiles every specialisation the launchers use (constexpr modes, V split, teacher
logits, row weights) to a cubin with Triton's bundled ptxas, in a subprocess without
TRITON_INTERPRET, so a kernel that only works in the interpreter fails here, not on the
first GPU it meets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _compile_all() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import trainer.ops.dense_kl_kernel as dense
    import trainer.ops.topk_kl_kernel as topk

    count = 0

    def build(fn, pointers: dict[str, str], consts: dict[str, object], warps: int = 8) -> None:
        nonlocal count
        sig = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in fn.arg_names}
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        assert out.asm.get("cubin"), f"{fn.__name__}: no cubin"
        count += 1

    f32 = "*fp32"
    fwd = dict(z_ptr="*bf16", t_ptr="*bf16", w_ptr=f32, rho_ptr=f32, mx_ptr=f32, s_ptr=f32,
               a_ptr=f32, tmx_ptr=f32, ts_ptr=f32)  # fmt: skip
    for splits, logits, rows in ((1, False, False), (4, True, True), (1, True, False)):
        build(dense._dense_kl_fwd_kernel, fwd, dict(SPLITS=splits, TEACHER_IS_LOGITS=logits,
              HAS_ROW_WEIGHTS=rows, BLOCK_M=4, BLOCK_V=4096))  # fmt: skip
    bwd = dict(z_ptr="*bf16", t_ptr="*fp16", tlse_ptr=f32, w_ptr=f32, coef_ptr=f32,
               lse_ptr=f32, kl_ptr=f32, g_ptr="*bf16")  # fmt: skip
    for logits in (False, True):
        build(dense._dense_kl_bwd_kernel, bwd, dict(TEACHER_IS_LOGITS=logits, BLOCK_V=2048), 4)
    tk = dict(z_ptr="*bf16", ids_ptr="*i64", lq_ptr=f32, w_ptr=f32, rho_ptr=f32, lse_ptr=f32,
              kl_ptr=f32, mass_ptr=f32, tail_ptr=f32, coef_ptr=f32, gs_ptr=f32)  # fmt: skip
    for mode, rows, given in ((0, True, False), (1, True, True), (2, False, False)):
        build(topk._topk_kl_kernel, tk, dict(MODE=mode, HAS_ROW_WEIGHTS=rows, LSE_GIVEN=given,
              BLOCK_V=8192, BLOCK_K=64))  # fmt: skip
    build(topk._lse_partial_kernel, dict(z_ptr="*fp16", rho_ptr=f32, mx_ptr=f32, s_ptr=f32),
          dict(SPLITS=4, HAS_ROW_WEIGHTS=True, BLOCK_V=8192))  # fmt: skip
    build(topk._exact_dense_bwd_kernel, dict(z_ptr="*fp32", lse_ptr=f32, coef_ptr=f32,
          g_ptr="*fp32"), dict(BLOCK_V=2048), 4)  # fmt: skip
    build(topk._store_support_kernel, dict(g_ptr="*bf16", ids_ptr="*i64", gs_ptr=f32,
          go_ptr=f32), dict(BLOCK_K=64), 4)  # fmt: skip
    return count


@pytest.mark.slow
def test_every_kernel_specialisation_compiles_for_sm90(tmp_path):
    pytest.importorskip("triton")
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this triton build has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from a cache
    run = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=500)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "compiled 11 kernels" in run.stdout


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(f"compiled {_compile_all()} kernels for sm_90")
