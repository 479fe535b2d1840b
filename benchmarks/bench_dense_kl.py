"""Benchmark the Dense-gradient kernels (issue 3): time, GB/s, % of copy bandwidth, peak memory.

Full-vocabulary KL (forward + backward) and top-K KL ("sparse" mode) against the pure-torch
reference run eagerly with autograd, torch.compile of the same reference, and Liger-Kernel's
JSD with β = 1 (reverse KL) when liger_kernel is installed and CUDA is present.

    python -m benchmarks.bench_dense_kl                 # CUDA if present, else CPU sizes
    python -m benchmarks.bench_dense_kl --full          # N = 8192, V = 151,936, K = 64
    python -m benchmarks.bench_dense_kl --device cpu --n 256 --v 32768

GB/s counts the bytes a method must move at least, the same for every method: full vocab
reads the student logits and the teacher log-probs once and writes the gradient once
(N·V·(s_z + M·s_q + s_z)); top-K reads the logits once (N·V·s_z; the [N, K] traffic is
negligible). "% copy" divides by the bandwidth of a measured device-to-device copy
(2 × bytes / time of dst.copy_(src)). Peak memory is above the inputs: CUDA
max_memory_allocated, CPU the growth of the process's peak RSS (VmHWM, reset before each
method); run with MALLOC_MMAP_THRESHOLD_=65536 on CPU so that freed tensors leave the RSS,
otherwise memory reused from an earlier call is not seen.
The Triton kernels are timed only on CUDA: the CPU interpreter is a correctness tool.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trainer.ops import build_support, dense_kl_reference, topk_kl_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Result:
    name: str
    seconds: float
    gbytes: float
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


def measure(
    name: str, fn: Callable[[], object], device: torch.device, nbytes: int, reps: int, warmup: int
) -> Result:
    if device.type == "cuda":
        fn()  # compile / autotune outside the peak window
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        fn()
        _reset_cpu_peak()
        base = _cpu_peak_kib()
        fn()
        peak = (_cpu_peak_kib() - base) / 1024
    sec = time_it(fn, device, reps, warmup)
    return Result(name, sec, nbytes / sec / 1e9, peak)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--full", action="store_true", help="N=8192, V=151936, K=64 (GPU sizes)")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--v", type=int, default=None)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.n or (8192 if args.full or gpu else 256)
    v = args.v or (151_936 if args.full or gpu else 32_768)
    reps = args.reps or (20 if gpu else 5)
    dtype = DTYPES[args.dtype]
    sz = torch.finfo(dtype).bits // 8

    gen = torch.Generator(device="cpu").manual_seed(0)
    z = (torch.randn(n, v, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(n, v, generator=gen) * 2).log_softmax(-1).to(device=device, dtype=dtype)
    ids = build_support("student", args.k, z)
    lq = t.float().gather(-1, ids)

    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; N={n} V={v} K={args.k} {args.dtype}")
    bw = copy_bandwidth(device, (1 << 30) if gpu else (256 << 20), reps)
    print(f"measured copy bandwidth: {bw:.1f} GB/s")
    if not gpu:  # CPU timings move with whatever else the machine is running
        print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
        if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            print("note: peak memory undercounts without MALLOC_MMAP_THRESHOLD_=65536")

    full_bytes = n * v * 3 * sz  # read z, read log q, write grad
    topk_bytes = n * v * sz  # one read of z
    rows: list[tuple[str, Result]] = []

    def add(section: str, label: str, fn: Callable[[], object], nbytes: int) -> None:
        try:
            rows.append((section, measure(label, fn, device, nbytes, reps, 1)))
        except Exception as e:  # a missing compiler or OOM must not end the whole run
            print(f"[skip] {section} / {label}: {type(e).__name__}: {str(e).splitlines()[0]}")

    dense_ref = lambda zz: dense_kl_reference(zz, t)
    topk_ref = lambda zz: topk_kl_reference(zz, ids, lq, mode="sparse").kl
    if gpu:
        from trainer.ops.dense_kl_kernel import dense_kl_triton
        from trainer.ops.topk_kl_kernel import topk_kl_triton

        add(
            "full vocab", "triton kernel", fwd_bwd(lambda zz: dense_kl_triton(zz, t), z), full_bytes
        )
    else:
        print("[skip] triton kernels: no CUDA (the CPU interpreter is for correctness, not speed)")
    add("full vocab", "torch eager (autograd)", fwd_bwd(dense_ref, z), full_bytes)
    if not args.no_compile:
        add("full vocab", "torch.compile", fwd_bwd(torch.compile(dense_ref), z), full_bytes)
    try:
        from liger_kernel.transformers import LigerJSD  # type: ignore[import-not-found]

        if not gpu:
            raise ImportError("Liger-Kernel needs CUDA")
        # β = 1 is KL(student ‖ teacher); Liger takes student log-probs (log_q) and teacher
        # log-probs (log_p), so its time includes the student's log_softmax.
        jsd = LigerJSD(beta=1.0)
        liger = lambda zz: jsd(zz.log_softmax(-1), t)
        add(
            "full vocab",
            "Liger JSD beta=1",
            fwd_bwd(lambda zz: liger(zz).reshape(1), z),
            full_bytes,
        )
    except ImportError as e:
        print(f"[skip] Liger-Kernel JSD: {e}")

    if gpu:
        add("top-K", "triton kernel (sparse)", fwd_bwd(
            lambda zz: topk_kl_triton(zz, ids, lq).kl, z), topk_bytes)  # fmt: skip
    add("top-K", "torch eager (autograd)", fwd_bwd(topk_ref, z), topk_bytes)
    if not args.no_compile:
        add("top-K", "torch.compile", fwd_bwd(torch.compile(topk_ref), z), topk_bytes)

    print("\n| kernel | method | time (ms) | GB/s | % copy BW | peak mem (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for section, r in rows:
        print(
            f"| {section} | {r.name} | {r.seconds * 1e3:.2f} | {r.gbytes:.2f} | "
            f"{100 * r.gbytes / bw:.2f} | {r.peak_mib:.0f} |"
        )
    one_read = topk_bytes / (bw * 1e9)  # bw counts read + write bytes, a read is X bytes
    print(f"\none read of the student logits at copy speed: {one_read * 1e3:.2f} ms")
    for section, r in rows:
        if section == "top-K":
            print(f"top-K {r.name}: {r.seconds / one_read:.1f}x one read (goal <= 1.5x on GPU)")


if __name__ == "__main__":
    main()
