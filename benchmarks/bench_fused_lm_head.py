"""Fused LM head + top-K KL + log π(y) against eager autograd over materialised logits.

Both variants compute the same thing from hidden states h [N, d] and a head W [V, d] + b:
the top-K Dense KL ("sparse" by default), log π(y) and the gradients w.r.t. h, W and b of
kl·g₁ + log π(y)·g₂ (random g, as the hybrid loss sends). "fused" is
trainer.ops.fused_lm_head_topk_kl; "eager" is what dense.fused: false does in train.py:
z = h Wᵀ + b, then topk_kl (torch backend on CPU) and a log-softmax for log π(y).

Each variant runs in its own subprocess, so that its memory is measured alone: peak
memory above the inputs (CPU: growth of VmHWM after resetting it, with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the RSS; CUDA:
max_memory_allocated), also reported without the gradients dh, dW, db that every method
must return ("beyond grads"). Time: median forward + backward over --repeats after one
warm-up, eager and fused alternating in one process.

    python -m benchmarks.bench_fused_lm_head                  # N=2048 d=896 V=151,936 K=64 fp32
    python -m benchmarks.bench_fused_lm_head --device cuda --dtype bf16 --n 8192 --d 3584
    python -m benchmarks.bench_fused_lm_head --dry-run --json out.json   # tiny, seconds

Goal (issue 9, CPU, the default sizes): the fused op's peak extra memory ≤ 1/10 of
eager's, its time ≤ 1.5× eager's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from trainer.ops import topk_kl
from trainer.ops.fused_lm_head import fused_lm_head_topk_kl

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIG_KEYS = ("device", "dtype", "n", "d", "v", "k", "mode", "repeats", "threads", "dry_run")
GOALS = {"memory_ratio_max": 0.1, "time_ratio_max": 1.5}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _now_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated()
    return _rss_kib("VmRSS") * 1024


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kib("VmHWM") * 1024


def _inputs(args, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    dt = DTYPES[args.dtype]
    N, d, V, K = args.n, args.d, args.v, args.k
    h = (torch.randn(N, d, generator=gen)).to(device, dt)
    W = (torch.randn(V, d, generator=gen) * d**-0.5).to(device, dt)
    b = (torch.randn(V, generator=gen) * 0.1).to(device, dt)
    y = torch.randint(0, V, (N,), generator=gen).to(device)
    ids = torch.randint(0, V, (N, K), generator=gen).to(device)  # repeats count once
    lq = (torch.randn(N, K, generator=gen) - 8.0).to(device)
    g = torch.randn(2, N, generator=gen).to(device)
    return h, W, b, y, ids, lq, g


def _step(variant: str, mode: str, h, W, b, y, ids, lq, g):
    """One forward + backward; returns (Σ kl, Σ log π(y), bytes of the gradients)."""
    leaves = [x.detach().requires_grad_(True) for x in (h, W, b)]
    hh, WW, bb = leaves
    if variant == "fused":
        r = fused_lm_head_topk_kl(hh, WW, bb, y, ids, lq, mode=mode)
        kl, lp = r.kl, r.token_logprob
    else:
        z = hh @ WW.T + bb  # [N, V]
        kl = topk_kl(z, ids, lq, mode=mode).kl
        lp = z.float().gather(-1, y.view(-1, 1)).squeeze(-1) - torch.logsumexp(z.float(), -1)
    (kl * g[0] + lp * g[1]).sum().backward()
    grads = sum(x.grad.numel() * x.grad.element_size() for x in leaves)
    return float(kl.detach().sum()), float(lp.detach().sum()), grads


def _timed(variant: str, mode: str, device: torch.device, inputs) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _step(variant, mode, *inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_child(args) -> dict:
    """One variant alone in this process: the memory of its first step."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = _inputs(args, device)
    base = _now_bytes(device)
    _reset_peak(device)
    kl, lp, grad_bytes = _step(args.variant, args.mode, *inputs)
    peak = _peak_bytes(device) - base
    return {
        "variant": args.variant,
        "peak_extra_bytes": peak,
        "peak_extra_beyond_grads_bytes": peak - grad_bytes,
        "grad_bytes": grad_bytes,
        "sum_kl": kl,
        "sum_logprob": lp,
    }


def _child(args, variant: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_fused_lm_head", "--child", variant]
    for key in ("device", "dtype", "n", "d", "v", "k", "mode", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=896)
    p.add_argument("--v", type=int, default=151936)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--mode", default="sparse", choices=["sparse", "exact", "renorm"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one repeat: seconds")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--child", choices=["fused", "eager"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.dry_run:
        args.n, args.d, args.v, args.k, args.repeats = 64, 32, 1000, 8, 1
    if args.child:
        args.variant = args.child
        print(json.dumps(run_child(args)))
        return 0

    res = {v: _child(args, v) for v in ("eager", "fused")}
    # Time in this process, the variants alternating, so that a change in the machine's
    # load (it is shared) hits both alike; one warm-up each.
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = _inputs(args, device)
    times: dict[str, list[float]] = {"eager": [], "fused": []}
    for i in range(args.repeats + 1):
        for v in times:
            t = _timed(v, args.mode, device, inputs)
            if i:
                times[v].append(t)
    for v, ts in times.items():
        res[v] |= {"time_s": statistics.median(ts), "times_s": ts}
    f, e = res["fused"], res["eager"]
    mem_ratio = f["peak_extra_bytes"] / max(e["peak_extra_bytes"], 1)
    time_ratio = f["time_s"] / e["time_s"]
    report = {
        "benchmark": "fused_lm_head",
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "config": {k: getattr(args, k) for k in CONFIG_KEYS},
        "results": res,
        "memory_ratio": mem_ratio,
        "memory_ratio_beyond_grads": f["peak_extra_beyond_grads_bytes"]
        / max(e["peak_extra_beyond_grads_bytes"], 1),
        "time_ratio": time_ratio,
        "goals": GOALS,
        "goals_met": {
            "memory": mem_ratio <= GOALS["memory_ratio_max"],
            "time": time_ratio <= GOALS["time_ratio_max"],
        },
    }
    mib = 2.0**20
    print("| variant | fwd+bwd s | peak extra MiB | beyond grads MiB | Σ kl | Σ log π(y) |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['time_s']:.3f} | {r['peak_extra_bytes'] / mib:.0f} | "
              f"{r['peak_extra_beyond_grads_bytes'] / mib:.0f} | {r['sum_kl']:.6g} | "
              f"{r['sum_logprob']:.6g} |")  # fmt: skip
    print(f"fused/eager: memory {mem_ratio:.3f} (beyond grads "
          f"{report['memory_ratio_beyond_grads']:.3f}), time {time_ratio:.2f}x")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
