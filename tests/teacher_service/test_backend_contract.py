"""The scoring contract, checked identically for every backend (torch, vllm).

Each backend scores fresh random sequences of one random float32 model; every result is
checked against an independent float64 transformers forward:

* top-K log-probs equal the reference's sorted top-K within 1e-4, every returned id has
  that log-prob in the reference, and the ids equal the reference's except where two
  log-probs tie within the tolerance;
* token log-probs, query-id log-probs and leftover mass match within 1e-4;
* rows are sliced to the response (row r is token start + r), temperature divides the
  logits before log_softmax, a batch scores like its items one by one.

Then both backends are served by real gRPC servers on 127.0.0.1 and must agree on Info
(apart from the backend name), on scores, and on the status code and message of bad
requests.

vLLM cases are marked `vllm` and skip when vllm is not importable: CI runs this file a
second time inside .venv-vllm (tools/setup_vllm_cpu.sh). One engine per module; vLLM
starts in 15-50 s on CPU.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_service.backends.base import Backend
from teacher_service.backends.torch_backend import TorchBackend
from teacher_service.codec import decode_result, encode
from teacher_service.config import ModelSpec, ServerConfig
from teacher_service.random_model import save_random_model
from teacher_service.server import ThreadedServer, serve_in_thread
from teacher_service.types import ScoreItem, ScoreResult
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc

VOCAB = 1000
MAX_LEN = 512  # the model's positions
MAX_SEQ = MAX_LEN - 1  # the bound both backends serve (vLLM needs a slot to generate into)
MAX_TOP_K = 64
TOL = 1e-4
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
NO_VLLM = "vllm is not importable here; run inside .venv-vllm (tools/setup_vllm_cpu.sh)"

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        "vllm",
        id="vllm",
        marks=[pytest.mark.vllm, pytest.mark.skipif(not HAVE_VLLM, reason=NO_VLLM)],
    ),
]

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread: backends outlive a test, so their loop must too."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 300.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def contract_model(path: Path) -> Path:
    """V = 1000, hidden 64, 2 heads (vLLM's CPU attention needs head_dim >= 32).

    init_std 0.25: peaked enough that top-K is meaningful, small enough that vLLM's and
    transformers' float32 kernels agree to ~5e-5 over 500 positions (at 0.5 they drift
    to ~2.5e-4).
    """
    return save_random_model(
        path, VOCAB, hidden=64, layers=2, heads=2, max_positions=MAX_LEN, seed=11, init_std=0.25
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contract_model(tmp_path_factory.mktemp("contract"))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def new_backend(name: str, model_dir: Path) -> Backend:
    if name == "torch":
        return TorchBackend(model_dir, max_sequence_length=MAX_SEQ)
    from teacher_service.backends.vllm_backend import VllmBackend

    return VllmBackend(
        model_dir,
        max_top_k=MAX_TOP_K,
        dtype="float32",
        max_model_len=MAX_SEQ,
        kv_cache_memory_bytes=256 << 20,
    )


@pytest.fixture(scope="module")
def backends(model_dir: Path, loop: LoopThread) -> Iterator[dict[str, Backend]]:
    """Backends started on first use, one of each kind for the module."""
    started: dict[str, Backend] = {}
    yield started
    for backend in started.values():
        loop.run(backend.close())


@pytest.fixture
def backend(
    request: pytest.FixtureRequest,
    backends: dict[str, Backend],
    model_dir: Path,
    loop: LoopThread,
) -> Backend:
    name = request.param
    return started_backend(name, backends, model_dir, loop)


_start_errors: dict[str, BaseException] = {}


def started_backend(
    name: str, backends: dict[str, Backend], model_dir: Path, loop: LoopThread
) -> Backend:
    """The module's backend of this kind; a failed start fails every later test at once."""
    if name in _start_errors:
        pytest.fail(f"{name} backend failed to start: {_start_errors[name]!r}")
    if name not in backends:
        candidate = new_backend(name, model_dir)
        try:
            loop.run(candidate.start())
        except BaseException as err:
            _start_errors[name] = err
            loop.run(candidate.close())
            raise
        backends[name] = candidate
    return backends[name]


def parametrize_backends(test: Any) -> Any:
    return pytest.mark.parametrize("backend", BACKENDS, indirect=True)(test)


# -- reference and checks -----------------------------------------------------------------


def ref_logp(model: torch.nn.Module, item: ScoreItem) -> torch.Tensor:
    """float64 [R, V]: log_softmax(logits / T) of rows start-1 .. L-2."""
    with torch.inference_mode():
        logits = model(input_ids=item.token_ids[None]).logits[0].double()
    return torch.log_softmax(logits[item.start - 1 : item.length - 1] / item.temperature, -1)


def check_result(result: ScoreResult, item: ScoreItem, ref: torch.Tensor, where: str) -> None:
    """Asserts the contract for one item against its float64 reference rows [R, V]."""
    rows, k = item.num_rows, item.top_k
    assert result.topk_ids.shape == (rows, k) and result.topk_ids.dtype == torch.int32, where
    assert result.topk_logprobs.dtype == torch.float32, where
    ids = result.topk_ids.long()
    got = result.topk_logprobs.double()
    ref_sorted, ref_ids = ref.topk(k, dim=-1)
    torch.testing.assert_close(got, ref_sorted, atol=TOL, rtol=0, msg=f"{where}: top-K values")
    torch.testing.assert_close(
        got, ref.gather(1, ids), atol=TOL, rtol=0, msg=f"{where}: returned ids' log-probs"
    )
    # Ids may differ only at slots whose reference log-prob ties a neighbour's.
    vals = ref.topk(min(k + 1, ref.shape[1]), dim=-1).values  # [R, K or K + 1]
    near = (vals[:, :-1] - vals[:, 1:]) < 2 * TOL  # near[:, j]: slots j and j + 1 tie
    tie = torch.zeros(rows, k, dtype=torch.bool)
    tie[:, : near.shape[1]] |= near[:, :k]
    tie[:, 1:] |= near[:, : k - 1]
    mismatch = (ids != ref_ids) & ~tie
    assert not mismatch.any(), f"{where}: top-K ids differ without a tie at {mismatch.nonzero()}"
    targets = item.token_ids[item.start :]
    torch.testing.assert_close(
        result.token_logprobs.double(),
        ref.gather(1, targets[:, None])[:, 0],
        atol=TOL,
        rtol=0,
        msg=f"{where}: token log-probs",
    )
    outside = ref.scatter(1, ids, float("-inf"))
    torch.testing.assert_close(
        result.leftover_logmass.double(),
        torch.logsumexp(outside, -1),
        atol=TOL,
        rtol=0,
        msg=f"{where}: leftover mass",
    )
    if item.query_ids is None:
        assert result.query_logprobs is None, where
    else:
        assert result.query_logprobs is not None, where
        torch.testing.assert_close(
            result.query_logprobs.double(),
            ref.gather(1, item.query_ids),
            atol=TOL,
            rtol=0,
            msg=f"{where}: query log-probs",
        )


def random_items(
    gen: torch.Generator, n: int, max_len: int = 160, **fields: Any
) -> list[ScoreItem]:
    items = []
    for _ in range(n):
        length = int(torch.randint(2, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        start = int(torch.randint(1, length, (1,), generator=gen))
        top_k = int(torch.randint(1, MAX_TOP_K + 1, (1,), generator=gen))
        items.append(ScoreItem(ids, start, top_k, **fields))
    return items


def fresh_gen() -> tuple[torch.Generator, int]:
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


# -- the contract through the Backend interface -------------------------------------------


@parametrize_backends
def test_rows_match_reference(
    backend: Backend, loop: LoopThread, reference: torch.nn.Module
) -> None:
    gen, seed = fresh_gen()
    items = random_items(gen, 12)
    results = loop.run(backend.score(items))
    assert len(results) == len(items)
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        check_result(result, item, ref_logp(reference, item), f"seed {seed} item {i}")


@parametrize_backends
def test_rows_are_sliced_from_start(backend: Backend, loop: LoopThread) -> None:
    gen, seed = fresh_gen()
    ids = torch.randint(
        0, VOCAB, (int(torch.randint(20, 120, (1,), generator=gen)),), generator=gen
    )
    starts = [1, 7, ids.numel() // 2, ids.numel() - 1]
    results = loop.run(backend.score([ScoreItem(ids, s, 10) for s in starts]))
    full = results[0]
    for start, result in zip(starts, results, strict=True):
        assert result.topk_ids.shape[0] == ids.numel() - start, f"seed {seed} start {start}"
        # Row r of a later start is row start - 1 + r of the full scoring.
        tail = slice(start - 1, None)
        torch.testing.assert_close(
            result.token_logprobs, full.token_logprobs[tail], atol=TOL, rtol=0
        )
        torch.testing.assert_close(result.topk_logprobs, full.topk_logprobs[tail], atol=TOL, rtol=0)


@parametrize_backends
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_logits(
    backend: Backend, loop: LoopThread, reference: torch.nn.Module, temperature: float
) -> None:
    gen, seed = fresh_gen()
    items = random_items(gen, 4, max_len=80, temperature=temperature)
    for i, (item, result) in enumerate(zip(items, loop.run(backend.score(items)), strict=True)):
        check_result(result, item, ref_logp(reference, item), f"seed {seed} T {temperature} {i}")


@parametrize_backends
def test_query_ids_match_reference(
    backend: Backend, loop: LoopThread, reference: torch.nn.Module
) -> None:
    assert backend.meta.supports_query_ids  # V * max_len fits the vllm full-row budget
    gen, seed = fresh_gen()
    items = []
    for item in random_items(gen, 4, max_len=80):
        query = torch.randint(0, VOCAB, (item.num_rows, 1 + len(items) * 3), generator=gen)
        items.append(ScoreItem(item.token_ids, item.start, item.top_k, query_ids=query))
    for i, (item, result) in enumerate(zip(items, loop.run(backend.score(items)), strict=True)):
        check_result(result, item, ref_logp(reference, item), f"seed {seed} query item {i}")


@parametrize_backends
def test_batch_scores_like_single_items(backend: Backend, loop: LoopThread) -> None:
    gen, seed = fresh_gen()
    items = random_items(gen, 6, max_len=100)
    together = loop.run(backend.score(items))
    for item, batched in zip(items, together, strict=True):
        (alone,) = loop.run(backend.score([item]))
        torch.testing.assert_close(
            batched.topk_logprobs, alone.topk_logprobs, atol=TOL, rtol=0, msg=f"seed {seed}"
        )
        torch.testing.assert_close(
            batched.token_logprobs, alone.token_logprobs, atol=TOL, rtol=0, msg=f"seed {seed}"
        )


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason=NO_VLLM)
def test_meta_agrees_across_backends(
    backends: dict[str, Backend], model_dir: Path, loop: LoopThread
) -> None:
    for name in ("torch", "vllm"):
        started_backend(name, backends, model_dir, loop)
    torch_meta, vllm_meta = backends["torch"].meta, backends["vllm"].meta
    assert (vllm_meta.backend, torch_meta.backend) == ("vllm", "torch")
    for field in (
        "model_name",
        "revision",
        "vocab_size",
        "tokenizer_fingerprint",
        "max_sequence_length",
        "supports_query_ids",
    ):
        assert getattr(vllm_meta, field) == getattr(torch_meta, field), field
    assert backends["vllm"].max_concurrent_batches > 1  # vLLM batches across calls itself


# -- the same through real gRPC servers ---------------------------------------------------


@pytest.fixture(scope="module")
def servers(model_dir: Path) -> Iterator[dict[str, ThreadedServer]]:
    if not HAVE_VLLM:
        pytest.skip(NO_VLLM)
    running: dict[str, ThreadedServer] = {}
    with pytest.MonkeyPatch.context() as env:
        # The server passes gpu_memory_utilization (a fraction of host RAM on CPU); a
        # fixed KV-cache size keeps the CPU engine small and independent of free memory.
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            for name in ("torch", "vllm"):
                config = ServerConfig(
                    models=(ModelSpec("contract", model_dir),),
                    host="127.0.0.1",
                    grpc_port=0,
                    http_port=0,
                    backend=name,
                    dtype="float32",
                    max_top_k=MAX_TOP_K,
                    max_sequence_length=MAX_SEQ,
                    grace_seconds=0.0,
                )
                running[name] = serve_in_thread(config)
            yield running
        finally:
            for server in running.values():
                server.stop()


def call(server: ThreadedServer, method: str, request: Any) -> Any:
    with grpc.insecure_channel(server.address) as channel:
        return getattr(pb_grpc.TeacherServiceStub(channel), method)(request, timeout=60)


def request_for(item: ScoreItem) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        token_ids=encode(item.token_ids.to(torch.int32)), start=item.start, top_k=item.top_k
    )
    if item.query_ids is not None:
        request.query_ids.CopyFrom(encode(item.query_ids.to(torch.int32)))
    if item.temperature != 1.0:
        request.temperature = item.temperature
    return request


@pytest.mark.vllm
def test_grpc_info_and_scores_agree(
    servers: dict[str, ThreadedServer], reference: torch.nn.Module
) -> None:
    infos = {name: call(s, "Info", pb.InfoRequest()).teachers[0] for name, s in servers.items()}
    assert infos["vllm"].backend == "vllm" and infos["torch"].backend == "torch"
    assert infos["vllm"].supports_query_ids
    for field in (
        "vocab_size",
        "tokenizer_fingerprint",
        "revision",
        "max_top_k",
        "max_sequence_length",
        "supports_query_ids",
        "max_query_ids",
    ):
        assert getattr(infos["vllm"], field) == getattr(infos["torch"], field), field
    gen, seed = fresh_gen()
    items = random_items(gen, 3, max_len=60)
    items.append(
        ScoreItem(
            items[0].token_ids,
            items[0].start,
            5,
            temperature=1.7,
            query_ids=torch.randint(0, VOCAB, (items[0].num_rows, 2)),
        )
    )

    def scored(name: str) -> float:
        sample = servers[name].metrics.registry.get_sample_value(
            "teacher_service_tokens_scored_total", {"teacher": "contract"}
        )
        return sample or 0.0

    before = {name: scored(name) for name in servers}
    for i, item in enumerate(items):
        for name, server in servers.items():
            scores = decode_result(call(server, "Score", request_for(item)))
            result = ScoreResult(
                scores.topk_ids,
                scores.topk_logprobs,
                scores.token_logprobs,
                scores.query_logprobs,
                scores.leftover_logmass,
            )
            check_result(result, item, ref_logp(reference, item), f"{name} seed {seed} {i}")
    # The scheduler's metrics count vLLM's work like the torch backend's.
    rows = sum(item.num_rows for item in items)
    assert {name: scored(name) - before[name] for name in servers} == {"torch": rows, "vllm": rows}


BAD_REQUESTS = {
    "start 0": lambda ids: pb.ScoreRequest(token_ids=encode(ids), start=0, top_k=4),
    "top_k too big": lambda ids: pb.ScoreRequest(
        token_ids=encode(ids), start=2, top_k=MAX_TOP_K + 1
    ),
    "id >= vocab": lambda ids: pb.ScoreRequest(
        token_ids=encode(torch.cat([ids, torch.tensor([VOCAB], dtype=torch.int32)])),
        start=2,
        top_k=4,
    ),
    "too long": lambda ids: pb.ScoreRequest(
        token_ids=encode(torch.zeros(MAX_SEQ + 1, dtype=torch.int32)), start=2, top_k=4
    ),
    "temperature 0": lambda ids: pb.ScoreRequest(
        token_ids=encode(ids), start=2, top_k=4, temperature=0.0
    ),
    "query rows": lambda ids: pb.ScoreRequest(
        token_ids=encode(ids),
        start=2,
        top_k=4,
        query_ids=encode(torch.zeros(ids.numel(), 2, dtype=torch.int32)),
    ),
}


@pytest.mark.vllm
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_grpc_bad_input_errors_are_identical(servers: dict[str, ThreadedServer], case: str) -> None:
    ids = torch.randint(0, VOCAB, (int(torch.randint(4, 30, (1,))),), dtype=torch.int32)
    request = BAD_REQUESTS[case](ids)
    errors = {}
    for name, server in servers.items():
        with pytest.raises(grpc.RpcError) as caught:
            call(server, "Score", request)
        errors[name] = (caught.value.code(), caught.value.details())
    assert errors["vllm"] == errors["torch"]
    assert errors["vllm"][0] == grpc.StatusCode.INVALID_ARGUMENT
