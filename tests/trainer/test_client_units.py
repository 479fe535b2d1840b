"""Pure parts of the teacher client: backoff maths, the balancing policy, handshake
comparisons, config and spec validation, and import isolation from the server side."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import grpc
import pytest
import torch

from teacher_service.v1 import teacher_pb2 as pb
from trainer.client import ClientConfig, HandshakeError, ScoreSpec, TlsOptions
from trainer.client.balance import Balancer
from trainer.client.errors import AttemptFailure
from trainer.client.handshake import Expectation, check, select_teacher
from trainer.client.retry import backoff_delay, is_retryable

# -- backoff -----------------------------------------------------------------------------


@pytest.mark.parametrize("retry", [1, 2, 3, 5, 9, 80])
def test_backoff_is_full_jitter_under_a_doubling_ceiling(seed: int, retry: int) -> None:
    rng = random.Random(seed)
    base, cap = 0.05, 2.0
    ceiling = min(cap, base * 2 ** (retry - 1))
    delays = [backoff_delay(retry, base, cap, rng=rng) for _ in range(4000)]
    assert all(0.0 <= d <= ceiling for d in delays)
    mean = sum(delays) / len(delays)
    assert abs(mean - ceiling / 2) < 0.05 * ceiling  # uniform(0, ceiling) has mean c/2
    assert max(delays) > 0.9 * ceiling and min(delays) < 0.1 * ceiling  # spread, not fixed


def test_backoff_never_undercuts_the_servers_hint(seed: int) -> None:
    rng = random.Random(seed)
    hint = rng.uniform(0.1, 5.0)
    for retry in range(1, 12):
        assert backoff_delay(retry, 0.05, 2.0, retry_after_s=hint, rng=rng) >= hint


def test_backoff_rejects_retry_zero() -> None:
    with pytest.raises(ValueError, match="retry must be >= 1"):
        backoff_delay(0, 0.05, 2.0)


@pytest.mark.parametrize(
    ("code", "lost", "retry"),
    [
        (grpc.StatusCode.UNAVAILABLE, False, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, False, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, False, True),
        (grpc.StatusCode.INVALID_ARGUMENT, False, False),
        (grpc.StatusCode.INTERNAL, False, False),
        (grpc.StatusCode.UNAVAILABLE, True, True),
        (grpc.StatusCode.INTERNAL, True, True),  # e.g. RST_STREAM when a peer dies
        (grpc.StatusCode.UNAUTHENTICATED, True, False),
        (grpc.StatusCode.UNIMPLEMENTED, True, False),
    ],
)
def test_which_failures_are_retried(code: grpc.StatusCode, lost: bool, retry: bool) -> None:
    assert is_retryable(AttemptFailure(code, "", connection_lost=lost)) is retry


# -- balancing ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _balancer(n: int, max_in_flight: int = 4, seed: int = 0) -> tuple[Balancer, Clock]:
    clock = Clock()
    targets = [f"h{i}:1" for i in range(n)]
    return Balancer(targets, max_in_flight, clock=clock, rng=random.Random(seed)), clock


def test_pick_prefers_the_least_loaded_and_spreads_ties(seed: int) -> None:
    balancer, _ = _balancer(3, seed=seed)
    loads = {"h0:1": 3, "h1:1": 1, "h2:1": 1}
    for target, load in loads.items():
        balancer.endpoints[target].in_flight = load
    picks = {balancer.pick().target for _ in range(200)}
    assert picks == {"h1:1", "h2:1"}


def test_pick_avoids_the_endpoint_that_just_failed_when_it_can(seed: int) -> None:
    balancer, _ = _balancer(2, seed=seed)
    assert all(balancer.pick(avoid="h0:1").target == "h1:1" for _ in range(50))
    balancer.endpoints["h1:1"].in_flight = 4  # full: the avoided one is all that is left
    assert balancer.pick(avoid="h0:1").target == "h0:1"


def test_cooling_endpoint_is_skipped_and_full_live_ones_make_callers_wait() -> None:
    balancer, clock = _balancer(2)
    balancer.mark_failed("h0:1")
    assert all(balancer.pick().target == "h1:1" for _ in range(20))
    balancer.endpoints["h1:1"].in_flight = 4
    assert balancer.pick() is None  # wait for h1, do not spill onto the failed h0
    clock.now += 10  # the cool-down is over: h0 gets one probe, no more
    assert balancer.pick().target == "h0:1"
    balancer.endpoints["h0:1"].in_flight = 1
    assert balancer.pick() is None
    balancer.mark_ok("h0:1")  # the probe succeeded: full capacity again
    assert balancer.pick().target == "h0:1"


def test_when_all_cool_down_the_earliest_to_recover_is_tried() -> None:
    balancer, _ = _balancer(3)
    for _ in range(3):
        balancer.mark_failed("h0:1")  # longer cool-down (doubling)
    balancer.mark_failed("h1:1")
    balancer.mark_failed("h2:1", at_least_s=5.0)  # a server's retry hint
    assert balancer.pick().target == "h1:1"
    assert balancer.endpoints["h0:1"].down_until > balancer.endpoints["h1:1"].down_until


def test_disabled_endpoints_are_never_picked() -> None:
    balancer, _ = _balancer(2)
    balancer.disable("h0:1", "serves another model")
    assert all(balancer.pick().target == "h1:1" for _ in range(20))
    balancer.disable("h1:1", "vocab differs")
    with pytest.raises(LookupError, match="h0:1: serves another model; h1:1: vocab differs"):
        balancer.pick()


def test_acquire_waits_for_a_free_slot() -> None:
    async def run() -> list[str]:
        balancer, _ = _balancer(1, max_in_flight=2)
        order: list[str] = []
        first = await balancer.acquire()
        await balancer.acquire()

        async def third() -> None:
            await balancer.acquire()
            order.append("third acquired")

        task = asyncio.create_task(third())
        await asyncio.sleep(0.01)
        order.append("releasing")
        balancer.release(first)
        await asyncio.wait_for(task, 1.0)
        return order

    assert asyncio.run(run()) == ["releasing", "third acquired"]


# -- handshake ---------------------------------------------------------------------------


def _info_response(name: str = "t", vocab: int = 1000, fingerprint: str = "ab" * 32,
                   revision: str = "r1") -> pb.InfoResponse:  # fmt: skip
    teacher = pb.TeacherInfo(
        name=name, model_name="m", revision=revision, vocab_size=vocab,
        tokenizer_fingerprint=fingerprint, max_top_k=64, max_sequence_length=512,
        backend="torch", logprob_dtypes=[pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16],
        supports_query_ids=True, max_query_ids=8,
    )  # fmt: skip
    return pb.InfoResponse(teachers=[teacher], default_teacher=name, server_version="9")


def test_select_teacher_reads_every_field() -> None:
    info = select_teacher(_info_response(), "", "h:1")
    assert (info.name, info.vocab_size, info.max_top_k, info.endpoint) == ("t", 1000, 64, "h:1")
    assert info.logprob_dtypes == (torch.float32, torch.bfloat16)
    assert info.server_version == "9" and info.max_query_ids == 8


def test_check_lists_every_difference_with_both_values() -> None:
    info = select_teacher(_info_response(), "", "h:1")
    with pytest.raises(HandshakeError) as error:
        check(info, Expectation(vocab_size=999, tokenizer_fingerprint="cd" * 32), None)
    assert str(error.value) == (
        "teacher 't' at h:1 does not match: vocab size: student 999 vs teacher 1000; "
        f"tokenizer fingerprint: student {'cd' * 32} vs teacher {'ab' * 32}"
    )
    check(info, Expectation(vocab_size=1000, tokenizer_fingerprint="ab" * 32), None)
    check(info, Expectation(), None)  # nothing asked, nothing checked


def test_check_compares_replicas() -> None:
    a = select_teacher(_info_response(), "", "a:1")
    b = select_teacher(_info_response(revision="r2"), "", "b:1")
    with pytest.raises(HandshakeError, match="revision: r1 at a:1 vs r2 at b:1"):
        check(b, Expectation(), a)


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoints": ()}, "at least one endpoint"),
        ({"endpoints": "h:1"}, "tuple of strings"),
        ({"endpoints": ("h:1", "h:1")}, "duplicates"),
        ({"deadline_s": 0}, "deadline_s must be > 0"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"backoff_base_s": 3.0}, "backoff_base_s <= backoff_max_s"),
        ({"max_in_flight": 0}, "max_in_flight must be >= 1"),
        ({"token": ""}, "token must not be empty"),
    ],
)
def test_client_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    fields = {"endpoints": ("h:1",), **kwargs}
    with pytest.raises((ValueError, TypeError), match=message):
        ClientConfig(**fields)


def test_tls_options_need_cert_and_key_together(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="client_cert and client_key"):
        TlsOptions(client_cert=tmp_path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token_ids": torch.zeros(3, 4, dtype=torch.long)}, "token_ids: expected an integer"),
        ({"token_ids": torch.zeros(8)}, "token_ids: expected an integer"),
        ({"start": 0}, r"start: must be in \[1, L - 1\]"),
        ({"top_k": 0}, "top_k: must be >= 1"),
        ({"query_ids": torch.zeros(5, 2, dtype=torch.long)}, r"query_ids: expected .*R=6"),
        ({"temperature": float("nan")}, "temperature: must be finite"),
        ({"logprob_dtype": torch.float64}, "logprob_dtype: must be one of"),
    ],
)
def test_score_spec_validation_names_the_field(change: dict, message: str) -> None:
    fields = {"token_ids": torch.arange(8), "start": 2, "top_k": 4, **change}
    with pytest.raises(ValueError, match=message):
        ScoreSpec(**fields).validate()


def test_client_imports_no_server_side_code() -> None:
    code = (
        "import sys, trainer.client\n"
        "bad = [m for m in sys.modules if m.startswith(('teacher_service.backends', "
        "'teacher_service.server', 'teacher_service.scheduler', 'teacher_service.servicer', "
        "'transformers', 'vllm'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
