"""The teacher service on vLLM against offline vLLM on the same sequences.

Baseline: `LLM.generate(max_tokens=1, prompt_logprobs=K, flat_logprobs=True)` over every
sequence at once, in its own process: the fastest way vLLM itself produces the same
log-probs. Service: a real server process (`--backend vllm`) and C gRPC clients that
stream their share of the sequences pipelined (all written, then all read), which is how
a trainer sends a step's rollouts; the time includes scheduling, result conversion,
encoding, transport and decoding. Goal: service >= 0.95x offline on the same machine.

Two workloads of N sequences of L tokens scored from `start` (prompt = start tokens):

    independent   every sequence has its own prompt
    groups        N / G prompts, each with G responses (GRPO-style group rollouts)

For `groups` the script also scores through `VllmBackend` directly with prefix caching
read back on (the backend's default) and off (vLLM's behaviour for prompt-logprob
requests) to measure what sharing the prompt's work saves. Each repeat uses fresh random
sequences (a repeat of the same ones would be served from the prefix cache); the best
repeat counts. Every engine (offline, server, two backends) stays up for the whole run
and the measurements interleave, so background load on a shared machine hits all sides.

    python benchmarks/bench_vllm.py                  # CPU defaults, ~8 minutes on 2 cores
    python benchmarks/bench_vllm.py --vocab 32000 --hidden 1024 --layers 8 --heads 16 \
        --sequences 512 --length 1024 --start 512    # a GPU-sized run

Runs inside an environment with vLLM (.venv-vllm on CPU, the [vllm] extra on GPU).
Prints a markdown table for docs/benchmarks.md, naming the device.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import torch

from teacher_service.codec import decode_result, encode
from teacher_service.random_model import save_random_model
from teacher_service.types import ScoreItem
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc

KV_CACHE_GIB = 1  # CPU only: vLLM's KV cache size in host memory
GPU_MEMORY_FRACTION = 0.2  # GPU only: four engines share one device


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def device_name() -> str:
    if on_cpu():
        model = platform.machine()
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.exists():
            names = re.findall(r"model name\s*:\s*(.+)", cpuinfo.read_text())
            model = names[0].strip() if names else model
        return f"CPU: {model}, {os.cpu_count()} cores"
    return f"GPU: {torch.cuda.get_device_name(0)}"


def make_workload(args: argparse.Namespace, kind: str, seed: int) -> list[torch.Tensor]:
    """N sequences int64 [L]; `groups` shares each prompt (first `start` ids) G ways."""
    gen = torch.Generator().manual_seed(seed)
    n, length, start = args.sequences, args.length, args.start
    if kind == "independent":
        return [torch.randint(0, args.vocab, (length,), generator=gen) for _ in range(n)]
    seqs = []
    for _ in range(n // args.group):
        prompt = torch.randint(0, args.vocab, (start,), generator=gen)
        for _ in range(args.group):
            response = torch.randint(0, args.vocab, (length - start,), generator=gen)
            seqs.append(torch.cat([prompt, response]))
    return seqs


def engine_kwargs() -> dict[str, Any]:
    if on_cpu():
        return {"kv_cache_memory_bytes": KV_CACHE_GIB << 30}
    return {"gpu_memory_utilization": GPU_MEMORY_FRACTION}


# -- engines in child processes, one each, alive for the whole run ------------------------
#
# All engines stay up and the measurements interleave (offline, service, ... per repeat),
# so that load from other processes on a shared machine hits every side alike. An idle
# vLLM engine uses no CPU.


def offline_worker(args: argparse.Namespace) -> Any:
    """Returns run(seqs) -> seconds for offline LLM.generate over all of seqs at once."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(args.model_dir),
        skip_tokenizer_init=True,
        dtype=args.dtype,
        max_logprobs=args.top_k,
        enforce_eager=on_cpu(),  # as the backend does on CPU
        disable_log_stats=True,
        **engine_kwargs(),
    )
    params = SamplingParams(
        max_tokens=1, temperature=0.0, prompt_logprobs=args.top_k, flat_logprobs=True,
        detokenize=False,
    )  # fmt: skip
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3, 4])], params, use_tqdm=False)

    def run(seqs: list[torch.Tensor]) -> float:
        prompts = [TokensPrompt(prompt_token_ids=t.tolist()) for t in seqs]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        assert all(len(o.prompt_logprobs) == len(s) for o, s in zip(outs, seqs, strict=True))
        return seconds

    return run


def backend_worker(args: argparse.Namespace, prefix_caching: bool) -> Any:
    """Returns run(seqs) -> seconds for one VllmBackend.score over all of seqs."""
    from teacher_service.backends.vllm_backend import VllmBackend

    loop = asyncio.new_event_loop()
    backend = VllmBackend(
        args.model_dir, max_top_k=args.top_k, dtype=args.dtype,
        prefix_caching=prefix_caching, **engine_kwargs(),
    )  # fmt: skip
    loop.run_until_complete(backend.start())

    def run(seqs: list[torch.Tensor]) -> float:
        items = [ScoreItem(t, args.start, args.top_k) for t in seqs]
        t0 = time.perf_counter()
        loop.run_until_complete(backend.score(items))
        return time.perf_counter() - t0

    return run


def serve_phase(args: argparse.Namespace) -> None:
    """Child process: start the engine, then answer "KIND INDEX" lines with seconds."""
    work = torch.load(args.work_file)
    if args.phase == "offline":
        run = offline_worker(args)
    else:
        run = backend_worker(args, prefix_caching=args.phase == "backend-cache")
    print("READY", flush=True)
    for line in sys.stdin:
        kind, index = line.split()
        print(f"TIME {run(work[kind][int(index)])}", flush=True)


class Phase:
    """A `serve_phase` child of this script."""

    def __init__(self, args: argparse.Namespace, phase: str, work_file: Path) -> None:
        command = [sys.executable, __file__, "--phase", phase, "--work-file", str(work_file)]
        command += ["--model-dir", str(args.model_dir), "--dtype", args.dtype]
        command += ["--top-k", str(args.top_k), "--start", str(args.start)]
        self.name = phase
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        raise RuntimeError(f"phase {self.name} exited with {self.proc.wait()}")

    def time(self, kind: str, index: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{kind} {index}\n")
        self.proc.stdin.flush()
        return float(self._expect("TIME "))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(120)


# -- the service ---------------------------------------------------------------------------


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, int]:
    command = [
        sys.executable, "-m", "teacher_service.server", "--model", f"bench={args.model_dir}",
        "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0", "--grace-seconds", "5",
        "--backend", "vllm", "--dtype", args.dtype, "--max-top-k", str(args.top_k),
    ]  # fmt: skip
    env = dict(os.environ)
    if on_cpu():
        env["VLLM_CPU_KVCACHE_SPACE"] = str(KV_CACHE_GIB)
    else:
        command += ["--gpu-memory-utilization", str(GPU_MEMORY_FRACTION)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        match = re.search(r"serving grpc_port=(\d+)", line)
        if match:
            # Keep reading the log so that a full pipe never blocks the server.
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, int(match.group(1))
    raise RuntimeError(f"server exited with {proc.wait()}")


async def stream_all(
    port: int, seqs: list[torch.Tensor], start: int, k: int, clients: int
) -> float:
    """Seconds for `clients` pipelined streams to score contiguous shares of `seqs`."""
    size = -(-len(seqs) // clients)
    shares = [seqs[i : i + size] for i in range(0, len(seqs), size)]

    async def client(index: int, share: list[torch.Tensor], channel: grpc.aio.Channel) -> None:
        call = pb_grpc.TeacherServiceStub(channel).ScoreStream(
            metadata=(("x-client-id", f"bench-{index}"),)
        )

        async def write() -> None:
            for j, ids in enumerate(share):
                await call.write(
                    pb.ScoreRequest(
                        request_id=str(j),
                        token_ids=encode(ids.to(torch.int32)),
                        start=start,
                        top_k=k,
                    )
                )
            await call.done_writing()

        writer = asyncio.ensure_future(write())
        for _ in share:
            response = await call.read()
            if response.WhichOneof("outcome") != "result":
                raise RuntimeError(f"request failed: {response}")
            decode_result(response.result)
        await writer

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in shares]
    try:
        for channel in channels:
            await pb_grpc.TeacherServiceStub(channel).Info(pb.InfoRequest())
        t0 = time.perf_counter()
        await asyncio.gather(
            *(client(i, s, c) for i, (s, c) in enumerate(zip(shares, channels, strict=True)))
        )
        return time.perf_counter() - t0
    finally:
        for channel in channels:
            await channel.close()


class Service:
    """A `--backend vllm` server process and pipelined gRPC clients against it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc, self.port = start_server(args)
        warm = [torch.randint(0, args.vocab, (args.length,)) for _ in range(4)]
        asyncio.run(stream_all(self.port, warm, args.start, args.top_k, 1))

    def time(self, seqs: list[torch.Tensor]) -> float:
        a = self.args
        return asyncio.run(stream_all(self.port, seqs, a.start, a.top_k, a.clients))

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--length", type=int, default=756)
    p.add_argument("--start", type=int, default=500)
    p.add_argument("--group", type=int, default=8, help="G responses per prompt (groups)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phase", choices=["offline", "backend-cache", "backend-nocache"])
    p.add_argument("--work-file", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.phase is not None:
        serve_phase(args)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = save_random_model(
                Path(tmp) / "model", args.vocab, hidden=args.hidden, layers=args.layers,
                heads=args.heads, max_positions=args.length + 1, seed=0, init_std=0.1,
            )  # fmt: skip
        kinds = ("independent", "groups")
        # Repeat r of every side scores the same fresh sequences.
        workloads = {k: [make_workload(args, k, r) for r in range(args.repeats)] for k in kinds}
        work_file = Path(tmp) / "work.pt"
        torch.save(workloads, work_file)
        times: dict[str, list[float]] = {}
        sides: list[Any] = []
        try:
            offline = Phase(args, "offline", work_file)
            sides.append(offline)
            service = Service(args)
            sides.append(service)
            cached = Phase(args, "backend-cache", work_file)
            sides.append(cached)
            uncached = Phase(args, "backend-nocache", work_file)
            sides.append(uncached)
            for r in range(args.repeats):
                for kind in kinds:
                    times.setdefault(f"offline {kind}", []).append(offline.time(kind, r))
                    times.setdefault(f"service {kind}", []).append(service.time(workloads[kind][r]))
                times.setdefault("cache off", []).append(uncached.time("groups", r))
                times.setdefault("cache on", []).append(cached.time("groups", r))
                print(f"repeat {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                      flush=True)  # fmt: skip
        finally:
            for side in sides:
                side.close()

    rows = (args.length - args.start) * args.sequences
    print(f"\nDevice: {device_name()}; model V={args.vocab} hidden={args.hidden} "
          f"layers={args.layers} {args.dtype}; N={args.sequences} L={args.length} "
          f"start={args.start} K={args.top_k} G={args.group}; {args.clients} clients; "
          f"best of {args.repeats}\n")  # fmt: skip
    print("| workload | offline LLM rows/s | service rows/s | service / offline |")
    print("|---|---:|---:|---:|")
    for kind in ("independent", "groups"):
        off, svc = rows / min(times[f"offline {kind}"]), rows / min(times[f"service {kind}"])
        print(f"| {kind} | {off:,.0f} | {svc:,.0f} | {svc / off:.2f}x |")
    on, off = rows / min(times["cache on"]), rows / min(times["cache off"])
    print("\n| groups through VllmBackend | rows/s |")
    print("|---|---:|")
    print(f"| prefix cache off (vLLM default for prompt log-probs) | {off:,.0f} |")
    print(f"| prefix cache read back on (backend default) | {on:,.0f} ({on / off:.2f}x) |")
    if args.json is not None:
        out = [
            {"workload": kind, "offline_rows_per_s": rows / min(times[f"offline {kind}"]),
             "service_rows_per_s": rows / min(times[f"service {kind}"])}
            for kind in ("independent", "groups")
        ]  # fmt: skip
        for r in out:
            r["service_over_offline"] = r["service_rows_per_s"] / r["offline_rows_per_s"]
        report = {
            "benchmark": "bench_vllm",
            "device": device_name(),
            "config": {k: str(v) for k, v in vars(args).items() if k != "json"},
            "rows": out,
            "prefix_cache_rows_per_s": {"off": off, "on": on},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
