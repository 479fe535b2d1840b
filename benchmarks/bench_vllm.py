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
repeat counts.

    python benchmarks/bench_vllm.py                  # CPU defaults, ~5 minutes on 2 cores
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

KV_CACHE_GIB = 2  # CPU only: vLLM's KV cache size in host memory


def on_cpu() -> bool:
    return not torch.cuda.is_available()


def device_name() -> str:
    if on_cpu():
        return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
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
    return {"kv_cache_memory_bytes": KV_CACHE_GIB << 30} if on_cpu() else {}


# -- phases run in child processes (one vLLM engine per process) -------------------------


def phase_offline(args: argparse.Namespace, work: list[list[torch.Tensor]]) -> list[float]:
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
    warm = [TokensPrompt(prompt_token_ids=[1, 2, 3, 4])]
    llm.generate(warm, params, use_tqdm=False)
    times = []
    for seqs in work:
        prompts = [TokensPrompt(prompt_token_ids=t.tolist()) for t in seqs]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(o.prompt_logprobs) == len(s) for o, s in zip(outs, seqs, strict=True))
    return times


def phase_backend(
    args: argparse.Namespace, work: list[list[torch.Tensor]], prefix_caching: bool
) -> list[float]:
    from teacher_service.backends.vllm_backend import VllmBackend

    async def run() -> list[float]:
        backend = VllmBackend(
            args.model_dir, max_top_k=args.top_k, dtype=args.dtype,
            prefix_caching=prefix_caching, **engine_kwargs(),
        )  # fmt: skip
        await backend.start()
        times = []
        try:
            for seqs in work:
                items = [ScoreItem(t, args.start, args.top_k) for t in seqs]
                t0 = time.perf_counter()
                await backend.score(items)
                times.append(time.perf_counter() - t0)
        finally:
            await backend.close()
        return times

    return asyncio.run(run())


def run_phase(args: argparse.Namespace, phase: str, work_file: Path, extra: list[str]) -> Any:
    """Runs `phase` in a child process of this script and returns its JSON answer."""
    command = [sys.executable, __file__, "--phase", phase, "--work-file", str(work_file)]
    command += ["--model-dir", str(args.model_dir), "--dtype", args.dtype]
    command += ["--top-k", str(args.top_k), "--start", str(args.start), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    answer = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not answer:
        raise RuntimeError(f"phase {phase} failed:\n{done.stderr[-4000:]}")
    return json.loads(answer[-1][len("RESULT ") :])


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


def service_times(args: argparse.Namespace, workloads: dict[str, list[list[torch.Tensor]]]) -> dict:
    proc, port = start_server(args)
    try:
        warm = [torch.randint(0, args.vocab, (args.length,)) for _ in range(4)]
        asyncio.run(stream_all(port, warm, args.start, args.top_k, 1))
        return {
            name: [
                asyncio.run(stream_all(port, seqs, args.start, args.top_k, args.clients))
                for seqs in work
            ]
            for name, work in workloads.items()
        }
    finally:
        proc.terminate()
        proc.wait(60)


# -- main ----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--length", type=int, default=384)
    p.add_argument("--start", type=int, default=256)
    p.add_argument("--group", type=int, default=8, help="G responses per prompt (groups)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--phase", choices=["offline", "backend-cache", "backend-nocache"])
    p.add_argument("--work-file", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.phase is not None:
        work = torch.load(args.work_file)
        if args.phase == "offline":
            answer = {name: phase_offline(args, w) for name, w in work.items()}
        else:
            answer = phase_backend(args, work["groups"], args.phase == "backend-cache")
        print("RESULT " + json.dumps(answer), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir is None:
            args.model_dir = save_random_model(
                Path(tmp) / "model", args.vocab, hidden=args.hidden, layers=args.layers,
                heads=args.heads, max_positions=args.length + 1, seed=0, init_std=0.1,
            )  # fmt: skip
        workloads = {
            kind: [make_workload(args, kind, seed) for seed in range(args.repeats)]
            for kind in ("independent", "groups")
        }
        work_file = Path(tmp) / "work.pt"
        torch.save(workloads, work_file)
        offline = run_phase(args, "offline", work_file, [])
        service = service_times(args, workloads)
        cached = run_phase(args, "backend-cache", work_file, [])
        uncached = run_phase(args, "backend-nocache", work_file, [])

    rows = (args.length - args.start) * args.sequences
    print(f"\nDevice: {device_name()}; model V={args.vocab} hidden={args.hidden} "
          f"layers={args.layers} {args.dtype}; N={args.sequences} L={args.length} "
          f"start={args.start} K={args.top_k} G={args.group}; {args.clients} clients; "
          f"best of {args.repeats}\n")  # fmt: skip
    print("| workload | offline LLM rows/s | service rows/s | service / offline |")
    print("|---|---:|---:|---:|")
    for kind in ("independent", "groups"):
        off, svc = rows / min(offline[kind]), rows / min(service[kind])
        print(f"| {kind} | {off:,.0f} | {svc:,.0f} | {svc / off:.2f}x |")
    on, off = rows / min(cached), rows / min(uncached)
    print("\n| groups through VllmBackend | rows/s |")
    print("|---|---:|")
    print(f"| prefix cache off (vLLM default for prompt log-probs) | {off:,.0f} |")
    print(f"| prefix cache read back on (backend default) | {on:,.0f} ({on / off:.2f}x) |")


if __name__ == "__main__":
    main()
