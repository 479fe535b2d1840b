"""Benchmark the Dense-gradient kernels against issue 9's GPU goals; JSON + Markdown out.

Forward + backward of the full-vocabulary KL and of the top-K KL ("sparse" mode), each by
the Triton kernel, the pure-torch reference run eagerly with autograd, torch.compile of the
same reference, and (full vocab) Liger-Kernel's JSD with β = 1 (reverse KL) when
liger_kernel is installed and CUDA is present. Top-K also runs topk_kl_support_grad, the
API that hands the K-sparse gradient to the caller and writes nothing of size [N, V].

    python -m benchmarks.bench_dense_kl                  # CUDA: N=8192, V=151,936, K=64, bf16
    python -m benchmarks.bench_dense_kl --json out.json  # the same, figures also as JSON
    TRITON_INTERPRET=1 python -m benchmarks.bench_dense_kl --tiny   # CPU smoke run, seconds

Goals (issue 9, H100/H200, bf16, N = 8192, V = 151,936): the full-vocab kernel at ≥ 80 % of
the measured copy bandwidth, ≥ 8× eager, ≥ 2× torch.compile. Bandwidth counts the bytes
the kernel moves: two reads of the logits and of each teacher (forward, and the backward's
recomputation) and one write of the gradient, N·V·(3 s_z + 2 M s_q); "GB/s (min)" divides
the least any method must move, N·V·(2 s_z + M s_q), by the same time. Top-K moves one
read of the logits (plus, through autograd, one [N, V] gradient write). "% copy" divides
by 2 × bytes / time of a device-to-device dst.copy_(src) of 1 GiB. Peak memory is above
the inputs: CUDA max_memory_allocated, CPU the growth of VmHWM (run with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the RSS). Off CUDA the Triton
kernels run only under TRITON_INTERPRET=1 (a correctness tool: timings mean nothing), and
the goals are not evaluated.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from trainer.ops import build_support, dense_kl_reference, topk_kl_reference, use_triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GOALS = {"pct_copy_bw": 80.0, "x_eager": 8.0, "x_compile": 2.0}


@dataclass(frozen=True)
class Row:
    section: str  # "full vocab" | "top-K"
    method: str
    ms: float
    gbps: float  # bytes the method's design moves / time (kernels), else the minimum bytes
    gbps_min: float  # the least bytes any method must move / time
    pct_copy_bw: float
    peak_mib: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_peak_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def _reset_cpu_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def time_it(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of fn() in seconds, synchronising around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Memory fn() allocates above what is live before it (fn already ran once)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _reset_cpu_peak()
    base = _cpu_peak_kib()
    fn()
    return (_cpu_peak_kib() - base) / 1024


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """GB/s of dst.copy_(src): read + write = 2 × nbytes per copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    sec = time_it(lambda: dst.copy_(src), device, reps, 2)
    return 2 * nbytes / sec / 1e9


def fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        loss_fn(z).sum().backward()
        z.grad = None  # free it here, so each call's peak memory includes its gradient

    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="N=8, V=1000, K=8, 1 rep: a smoke run")
    ap.add_argument("--full", action="store_true", help="N=8192, V=151936 even off CUDA")
    ap.add_argument("--n", type=int, default=None, help="rows (default 8192 on CUDA, 256 CPU)")
    ap.add_argument("--v", type=int, default=None, help="vocabulary (default 151,936 / 32,768)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here as JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.tiny:
        n, v, k, reps = args.n or 8, args.v or 1000, min(args.k, 8), args.reps or 1
    else:
        n = args.n or (8192 if gpu or args.full else 256)
        v = args.v or (151_936 if gpu or args.full else 32_768)
        k, reps = args.k, args.reps or (20 if gpu else 5)
    compile_on = not args.no_compile and not args.tiny  # compiling takes minutes on a CPU
    dtype = DTYPES[args.dtype]
    sz = torch.finfo(dtype).bits // 8

    gen = torch.Generator(device="cpu").manual_seed(0)
    z = (torch.randn(n, v, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=gen) * 2).log_softmax(-1).to(device=device, dtype=dtype)
    ids = build_support("student", k, z)
    lq = t.float().gather(-1, ids)

    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; N={n} V={v} K={k} {args.dtype}")
    bw = copy_bandwidth(device, (1 << 30) if gpu else (16 << 20 if args.tiny else 256 << 20), reps)
    print(f"measured copy bandwidth: {bw:.1f} GB/s")
    if not gpu:  # CPU timings move with whatever else the machine is running
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    full_min = n * v * (2 * sz + sz)  # read z, read log q, write grad
    full_kernel = n * v * (3 * sz + 2 * sz)  # + the backward's second read of z and log q
    topk_min = n * v * sz  # one read of z
    topk_autograd = n * v * 2 * sz  # + the dense [N, V] gradient write
    rows: list[Row] = []
    skipped: list[dict[str, str]] = []

    def add(section: str, method: str, fn: Callable[[], object], moved: int, least: int) -> None:
        try:
            fn()  # compile / autotune outside the timed and the peak window
            peak = peak_mib(fn, device)
            sec = time_it(fn, device, reps, 1)
        except Exception as e:  # a missing compiler or OOM must not end the whole run
            reason = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            print(f"[skip] {section} / {method}: {reason}")
            skipped.append({"section": section, "method": method, "reason": reason})
            return
        gbps = moved / sec / 1e9
        rows.append(Row(section, method, sec * 1e3, gbps, least / sec / 1e9, 100 * gbps / bw, peak))

    triton_ok = use_triton(z)  # CUDA, or the interpreter on CPU
    dense_ref = lambda zz: dense_kl_reference(zz, t)
    topk_ref = lambda zz: topk_kl_reference(zz, ids, lq, mode="sparse").kl
    if triton_ok:
        from trainer.ops.dense_kl_kernel import dense_kl_triton
        from trainer.ops.topk_kl_kernel import topk_kl_support_grad_triton, topk_kl_triton

        add("full vocab", "triton kernel", fwd_bwd(lambda zz: dense_kl_triton(zz, t), z),
            full_kernel, full_min)  # fmt: skip
    else:
        skipped.append({"section": "full vocab", "method": "triton kernel",
                        "reason": "no CUDA and TRITON_INTERPRET unset"})  # fmt: skip
    add("full vocab", "torch eager (autograd)", fwd_bwd(dense_ref, z), full_min, full_min)
    if compile_on:
        add("full vocab", "torch.compile", fwd_bwd(torch.compile(dense_ref), z), full_min, full_min)
    if gpu:
        try:
            from liger_kernel.transformers import LigerJSD  # type: ignore[import-not-found]

            # β = 1 is KL(student ‖ teacher); Liger takes student log-probs and teacher
            # log-probs, so its time includes the student's log_softmax.
            jsd = LigerJSD(beta=1.0)
            liger = fwd_bwd(lambda zz: jsd(zz.log_softmax(-1), t).reshape(1), z)
            add("full vocab", "Liger JSD beta=1", liger, full_min, full_min)
        except ImportError as e:
            skipped.append(
                {"section": "full vocab", "method": "Liger JSD beta=1", "reason": str(e)}
            )

    if triton_ok:
        add("top-K", "triton kernel, dense grad", fwd_bwd(
            lambda zz: topk_kl_triton(zz, ids, lq).kl, z), topk_autograd, topk_min)  # fmt: skip
        add("top-K", "triton support_grad [N, K]",
            lambda: topk_kl_support_grad_triton(z, ids, lq), topk_min, topk_min)  # fmt: skip
    add("top-K", "torch eager (autograd)", fwd_bwd(topk_ref, z), topk_min, topk_min)
    if compile_on:
        add("top-K", "torch.compile", fwd_bwd(torch.compile(topk_ref), z), topk_min, topk_min)

    by = {(r.section, r.method): r for r in rows}
    kern = by.get(("full vocab", "triton kernel"))
    eager = by.get(("full vocab", "torch eager (autograd)"))
    comp = by.get(("full vocab", "torch.compile"))
    goals: dict[str, object] = {"evaluated": bool(gpu and kern)}
    if kern is not None:
        goals["pct_copy_bw"] = kern.pct_copy_bw
        goals["x_eager"] = eager.ms / kern.ms if eager else None
        goals["x_compile"] = comp.ms / kern.ms if comp else None
        for key, want in GOALS.items():
            got = goals[key]
            goals[f"{key}_met"] = None if (got is None or not gpu) else bool(got >= want)
    one_read_ms = topk_min / (bw * 1e9) * 1e3  # bw counts read + write bytes: a read is X
    report = {
        "benchmark": "bench_dense_kl",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": name,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "shape": {"N": n, "V": v, "K": k, "M": 1, "dtype": args.dtype},
        "copy_bandwidth_gbps": bw,
        "one_read_of_logits_ms": one_read_ms,
        "goals": goals,
        "goal_targets": GOALS,
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
    }
    print(markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return report


def markdown(report: dict) -> str:
    lines = [
        "| kernel | method | time (ms) | GB/s moved | GB/s (min) | % copy BW | peak mem (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['section']} | {r['method']} | {r['ms']:.3f} | {r['gbps']:.1f} | "
            f"{r['gbps_min']:.1f} | {r['pct_copy_bw']:.1f} | {r['peak_mib']:.0f} |"
        )
    g = report["goals"]
    if "pct_copy_bw" in g:
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
        lines.append(
            f"\nfull-vocab kernel: {fmt(g['pct_copy_bw'])} % of copy bandwidth (goal ≥ 80), "
            f"{fmt(g['x_eager'])}× eager (goal ≥ 8), {fmt(g['x_compile'])}× torch.compile "
            f"(goal ≥ 2); goals evaluated: {g['evaluated']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
