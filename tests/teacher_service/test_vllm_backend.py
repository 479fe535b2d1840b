"""vLLM-specific behaviour of the teacher backend, beyond the shared contract.

* leftover mass from the top-K alone (pure function, runs without vLLM);
* the full-row budget: Info announces query ids unsupported when they might not fit,
  such requests and over-budget temperatures are refused naming the field and bound;
* prefix caching for group rollouts: G responses to one prompt share the prompt's work,
  rows stay exact, a cache hit past `start` is detected and rescored;
* a cancelled batch leaves no request inside vLLM.

The engine here is built with a small full-row budget (100 rows of V), unlike the
contract tests' default, so both sides of the budget are reachable.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_service.backends.vllm_rows import leftover_from_topk
from teacher_service.errors import ErrorKind, ServiceError
from teacher_service.random_model import save_random_model
from teacher_service.types import ScoreItem
from tests.teacher_service.procs import alive, descendants
from tests.teacher_service.test_backend_contract import (
    VOCAB,
    LoopThread,
    check_result,
    contract_model,
    ref_logp,
)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
FULL_ROW_ROWS = 100  # full-row budget in rows of V
BLOCK = 128  # vLLM's CPU KV-cache block size


# -- leftover mass from the top-K (no vLLM needed) ----------------------------------------


def test_leftover_from_topk_matches_complement_sum() -> None:
    """With exact float32 log-probs (float64 ones rounded) the top-K path is exact to 1e-4
    while the left-over mass is >= 1e-3; below that float32 top-K sums cannot resolve it,
    but it is still reported as tiny, never as large."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    logits = torch.randn(32, 300, generator=gen, dtype=torch.float64) * 3
    logp = torch.log_softmax(logits, -1)
    resolvable = torch.tensor(1e-3).log()
    for k in (1, 7, 150, 250, 299):
        top, ids = logp.topk(k, -1)
        expected = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1)
        got = leftover_from_topk(top.float(), vocab_size=300).double()
        big = expected >= resolvable
        torch.testing.assert_close(got[big], expected[big], atol=1e-4, rtol=0)
        assert (got[~big] < resolvable + 1e-2).all(), k


def leftover_mass_bound(vocab: int) -> float:
    """The documented absolute error of the top-K path's left-over mass (vllm_rows.py):
    vLLM's float32 normaliser rounding, ~1.5e-9 * V on CPU; 2x margin."""
    return 3e-9 * vocab


@pytest.mark.parametrize("vocab", [1000, 16384])
def test_leftover_on_a_peaked_teacher_is_within_the_stated_bound(vocab: int) -> None:
    """A peaked teacher (left-over mass 1e-7 .. 0.3) through a float32 log-softmax, as
    vLLM computes prompt log-probs: the mass is off by at most the stated delta, so the
    log is off by about delta / m (not 1e-4 at m >= 1e-3, as once claimed)."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    rows = 64
    base = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 2
    target = 10 ** (torch.rand(rows, generator=gen, dtype=torch.float64) * 6.5 - 7)
    top = base.argmax(-1, keepdim=True)
    rest = torch.logsumexp(base.scatter(1, top, float("-inf")), -1, keepdim=True)
    peak = rest + torch.log((1 - target[:, None]) / target[:, None])  # top-1 leaves `target`
    logits = (base.scatter(1, top, peak) + 12).float()  # an offset, as real logits have
    logp32 = torch.log_softmax(logits, -1)  # what vLLM returns
    exact = torch.log_softmax(logits.double(), -1)
    delta = leftover_mass_bound(vocab)
    for k in (1, 5, 40):
        top_lp, ids = logp32.topk(k, -1)
        got = leftover_from_topk(top_lp, vocab).double()
        want = torch.logsumexp(exact.scatter(1, ids, float("-inf")), -1)
        mass_err = (got.exp() - want.exp()).abs()
        assert mass_err.max() <= delta, (seed, k, mass_err.max().item())
        # In log space: |log(m +- delta) - log m| <= 2 delta / m while delta <= m / 2.
        rel = delta / want.exp()
        log_err = (got - want).abs()
        assert (log_err <= 2 * rel + 1e-6)[rel <= 0.5].all(), (seed, k)


def test_leftover_is_minus_inf_when_topk_covers_the_vocabulary() -> None:
    logp = torch.log_softmax(torch.randn(5, 12), -1)
    got = leftover_from_topk(logp.sort(-1, descending=True).values, vocab_size=12)
    assert torch.isneginf(got).all()


# -- with an engine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return contract_model(tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Iterator[tuple[Any, LoopThread]]:
    if not HAVE_VLLM:
        pytest.skip("vllm not importable; run inside .venv-vllm")
    from teacher_service.backends.vllm_backend import VllmBackend

    loop = LoopThread()
    backend = VllmBackend(
        model_dir,
        max_top_k=64,
        dtype="float32",
        kv_cache_memory_bytes=256 << 20,
        full_row_max_entries=FULL_ROW_ROWS * VOCAB,
    )
    loop.run(backend.start())
    try:
        yield backend, loop
    finally:
        loop.run(backend.close())
        loop.stop()


def refused(loop: LoopThread, backend: Any, item: ScoreItem) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        loop.run(backend.score([item]))
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    return caught.value


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_info_announces_query_ids_unsupported_and_they_are_refused(engine: Any) -> None:
    backend, loop = engine
    if backend.query_id_mode == "token_ids":
        pytest.skip("vLLM's V2 model runner scores query ids natively (no full-row budget)")
    assert backend.query_id_mode == "refused"
    meta = backend.meta
    assert meta.vocab_size * meta.max_sequence_length > FULL_ROW_ROWS * VOCAB
    assert meta.supports_query_ids is False
    ids = torch.randint(0, VOCAB, (12,))
    err = refused(
        loop, backend, ScoreItem(ids, 4, 3, query_ids=torch.zeros(8, 2, dtype=torch.long))
    )
    assert "query_ids" in err.message and "supports_query_ids" in err.message


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_temperature_within_budget_is_exact_and_beyond_it_refused(
    engine: Any, reference: torch.nn.Module
) -> None:
    backend, loop = engine
    ids = torch.randint(0, VOCAB, (FULL_ROW_ROWS + 40,))
    fits = ScoreItem(ids, 41, 9, temperature=1.6)  # R = FULL_ROW_ROWS - 1
    (result,) = loop.run(backend.score([fits]))
    check_result(result, fits, ref_logp(reference, fits), "T 1.6 within budget")
    err = refused(loop, backend, ScoreItem(ids, 2, 9, temperature=1.6))
    assert "temperature" in err.message and str(FULL_ROW_ROWS * VOCAB) in err.message
    # A refused item refuses its whole batch before vLLM sees any of it.
    before = backend.stats.requests
    with pytest.raises(ServiceError):
        loop.run(backend.score([fits, ScoreItem(ids, 2, 9, temperature=0.5)]))
    assert backend.stats.requests == before


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_group_rollouts_share_the_prompt_through_the_prefix_cache(
    engine: Any, reference: torch.nn.Module
) -> None:
    backend, loop = engine
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    prompt_len, group = 2 * BLOCK + 30, 4
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=gen)
    items = [
        ScoreItem(torch.cat([prompt, torch.randint(0, VOCAB, (n,), generator=gen)]), prompt_len, 8)
        for n in (5, 40, 17, 60)
    ]
    stats = backend.stats
    followers, cached, rescored = (
        stats.group_followers,
        stats.cached_prompt_tokens,
        stats.cache_rescored,
    )
    results = loop.run(backend.score(items))
    assert stats.group_followers - followers == group - 1
    # Every follower read the prompt's whole blocks (2 * BLOCK tokens) from the cache.
    assert stats.cached_prompt_tokens - cached >= (group - 1) * 2 * BLOCK
    assert stats.cache_rescored == rescored
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        check_result(result, item, ref_logp(reference, item), f"group member {i}")


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_prompt_of_whole_blocks_does_not_read_the_cache(
    engine: Any, reference: torch.nn.Module
) -> None:
    """start % block == 0: the cache would cover row start-1, so it is not read at all
    (reading would compute every follower twice)."""
    backend, loop = engine
    prompt = torch.randint(0, VOCAB, (2 * BLOCK,))
    items = [ScoreItem(torch.cat([prompt, torch.randint(0, VOCAB, (9,))]), 2 * BLOCK, 4)
             for _ in range(3)]  # fmt: skip
    stats = backend.stats
    cached, rescored, requests = stats.cached_prompt_tokens, stats.cache_rescored, stats.requests
    results = loop.run(backend.score(items))
    assert (stats.cached_prompt_tokens, stats.cache_rescored) == (cached, rescored)
    assert stats.requests == requests + len(items)
    for i, (item, result) in enumerate(zip(items, results, strict=True)):
        check_result(result, item, ref_logp(reference, item), f"whole-block member {i}")


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_cache_hit_past_start_is_rescored(engine: Any, reference: torch.nn.Module) -> None:
    backend, loop = engine
    ids = torch.randint(0, VOCAB, (2 * BLOCK + 50,))
    item = ScoreItem(ids, BLOCK + 10, 6)  # the second time, 2 blocks are cached > start - 1
    first = loop.run(backend.score([item]))[0]
    rescored = backend.stats.cache_rescored
    second = loop.run(backend.score([item]))[0]
    assert backend.stats.cache_rescored == rescored + 1
    torch.testing.assert_close(second.topk_logprobs, first.topk_logprobs, atol=1e-5, rtol=0)
    check_result(second, item, ref_logp(reference, item), "rescored item")


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_cancelled_batch_leaves_nothing_in_vllm(engine: Any) -> None:
    backend, loop = engine
    items = [ScoreItem(torch.randint(0, VOCAB, (500,)), 1, 64) for _ in range(24)]

    async def cancel_midway() -> int:
        task = asyncio.ensure_future(backend.score(items))
        while backend.unfinished_requests() == 0:
            await asyncio.sleep(0.001)
        inside = backend.unfinished_requests()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if backend.unfinished_requests() == 0:
                break
            await asyncio.sleep(0.01)
        return inside

    assert loop.run(cancel_midway()) > 0
    assert backend.unfinished_requests() == 0


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_a_model_the_cpu_engine_cannot_run_fails_at_start_naming_the_cause(
    tmp_path: Path,
) -> None:
    """head_dim 16 (hidden 32, 2 heads): vLLM's CPU attention needs >= 32. Before, the
    engine died later with only "vllm engine died; this teacher must be restarted"."""
    from vllm.platforms import current_platform

    from teacher_service.backends.vllm_backend import VllmBackend

    if not current_platform.is_cpu():
        pytest.skip("the head-size limit is vLLM CPU attention's")
    model = save_random_model(tmp_path / "m", 64, hidden=32, layers=1, heads=2, max_positions=64)
    loop = LoopThread()
    backend = VllmBackend(model, max_top_k=4, kv_cache_memory_bytes=64 << 20)
    try:
        with pytest.raises(ValueError, match=r"head_dim 16 .*CPU attention head sizes \[32,"):
            loop.run(backend.start(), timeout=120)
    finally:
        loop.run(backend.close())
        loop.stop()


# -- last: kills the module's engine ---------------------------------------------------------


def _engine_core_pids() -> set[int]:
    """EngineCore processes below this one (vLLM titles them VLLM::EngineCore)."""
    found = set()
    for pid in alive(descendants(os.getpid())):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"EngineCore" in title:
            found.add(pid)
    return found


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable")
def test_a_killed_engine_core_makes_the_backend_report_dead(engine: Any) -> None:
    """Kill -9 the engine-core process: `dead_reason` (what /healthz, /readyz and gRPC
    health report; see test_backend_health.py for that wiring) names the vLLM engine,
    and scoring answers UNAVAILABLE instead of hanging."""
    backend, loop = engine
    assert backend.dead_reason() is None
    (core,) = _engine_core_pids()
    os.kill(core, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while backend.dead_reason() is None:
        assert time.monotonic() < deadline, "vLLM never noticed its engine died"
        time.sleep(0.1)
    assert "vllm engine died" in backend.dead_reason()
    with pytest.raises(ServiceError) as caught:
        loop.run(backend.score([ScoreItem(torch.randint(0, VOCAB, (12,)), 4, 3)]), timeout=60)
    assert caught.value.kind is ErrorKind.UNAVAILABLE
