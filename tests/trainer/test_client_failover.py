"""Failover across replicas: a replica SIGKILLed mid-run, a draining replica, and all
replicas gone. Every sequence gets exactly one correct result or a clear error."""

from __future__ import annotations

import collections
import concurrent.futures
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.trainer.client_fixtures import (  # noqa: F401
    VOCAB,
    ReferenceModel,
    ServerProcess,
    assert_matches_reference,
    model_dir,
    random_specs,
    thread_server,
)
from trainer.client import ClientConfig, TeacherClient, TeacherUnavailableError


def _wait_until_gone_or_draining(proc: ServerProcess) -> None:
    """Returns once the replica has exited or reports NOT_SERVING on grpc.health.v1."""
    with grpc.insecure_channel(proc.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while proc.proc.poll() is None and time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError:
                continue  # already gone, or going: poll() tells
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            time.sleep(0.01)
    assert proc.proc.poll() is not None, "the replica neither exited nor started draining"


@pytest.mark.parametrize(
    ("sig", "grace"),
    [(signal.SIGKILL, "0"), (signal.SIGTERM, "30")],
    ids=["sigkill", "sigterm-drain"],
)
def test_replica_killed_mid_run_loses_and_duplicates_nothing(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
    sig: int,
    grace: str,
) -> None:
    # Small server batches keep each replica busy long enough to die with work in flight.
    # SIGKILL: its stream breaks with requests in flight. SIGTERM: it finishes what it
    # accepted, refuses new sequences with UNAVAILABLE, then exits cleanly.
    args = ("--max-batch-size", "2", "--grace-seconds", grace)
    procs = [ServerProcess(model_dir, *args) for _ in range(2)]
    try:
        victim, survivor = (p.wait_ready() for p in procs)
        specs = random_specs(gen, 300, min_len=8, max_len=96, top_k=8)
        before, after = specs[:200], specs[200:]  # submitted before / after the signal
        delivered: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()

        def count(future: concurrent.futures.Future) -> None:
            if future.exception() is None:
                with lock:
                    delivered[future.result().request_id] += 1

        def submit(batch: list) -> list[concurrent.futures.Future]:
            futures = [client.submit(spec) for spec in batch]
            for future in futures:
                future.add_done_callback(count)
            return futures

        config = ClientConfig(
            endpoints=(victim.address, survivor.address),
            client_id="failover-test",
            backoff_base_s=0.02,
            deadline_s=120.0,
        )
        with TeacherClient(config) as client:
            client.connect(vocab_size=VOCAB)
            futures = submit(before)
            # Let the victim answer some, then signal it while it still holds requests.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                done_by_victim = sum(
                    f.done() and f.exception() is None and f.result().endpoint == victim.address
                    for f in futures
                )
                if done_by_victim >= 10:
                    break
                time.sleep(0.005)
            in_flight_at_signal = client._client._balancer.endpoints[victim.address].in_flight
            victim.proc.send_signal(sig)
            _wait_until_gone_or_draining(victim)
            open_at_drain = [not f.done() for f in futures]
            futures += submit(after)  # a rollout loop that keeps going
            results = [f.result(timeout=120) for f in futures]
            exit_code = victim.proc.wait(timeout=60)
    finally:
        for proc in procs:
            proc.close()

    assert done_by_victim >= 10
    assert in_flight_at_signal > 0, "the replica went away idle: the test proved nothing"
    assert [r.request_id for r in results] == [s.request_id for s in specs]
    assert delivered == collections.Counter(s.request_id for s in specs)  # each exactly once
    assert {r.endpoint for r in results[len(before) :]} == {survivor.address}
    if sig == signal.SIGTERM:
        assert exit_code == 0
        drained = sum(
            still_open and r.endpoint == victim.address
            for still_open, r in zip(open_at_drain, results, strict=False)
        )
        assert drained >= 1, "the draining replica finished none of the work it held"
    else:
        assert exit_code == -signal.SIGKILL
    reference = ReferenceModel(model_dir)
    for result, spec, rows in zip(results, specs, reference.rows_many(specs), strict=True):
        assert_matches_reference(result, spec, rows)


def _wait_for_streams(srv: object, count: int, timeout_s: float = 10.0) -> float:
    """Polls the server's open-ScoreStream gauge until it equals `count`; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = srv.metrics.registry.get_sample_value("teacher_service_inflight_streams")
        if value == count or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def test_draining_replica_sends_requests_elsewhere(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    draining, healthy = thread_server(model_dir), thread_server(model_dir)
    try:
        config = ClientConfig(endpoints=(draining.address, healthy.address), max_retries=3)
        with TeacherClient(config) as client:
            client.connect(vocab_size=VOCAB)
            draining.begin_drain()
            specs = random_specs(gen, 40, max_len=32)
            results = client.score_batch(specs)
            # Told the replica is draining, the client half-closes its stream there once
            # nothing waits on it, so the replica can stop without cancelling it.
            open_streams = _wait_for_streams(draining, 0)
        refused = draining.metrics.registry.get_sample_value(
            "teacher_service_requests_total", {"method": "ScoreStream", "code": "UNAVAILABLE"}
        )
    finally:
        draining.stop()
        healthy.stop()
    assert {r.endpoint for r in results} == {healthy.address}
    assert [r.request_id for r in results] == [s.request_id for s in specs]
    # The drain was hit (then avoided for its retry hint), not merely lucky balancing.
    assert refused is not None and refused >= 1
    assert open_streams == 0


def test_all_replicas_gone_raises_unavailable_naming_attempts(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
) -> None:
    srv = thread_server(model_dir)
    address = srv.address
    config = ClientConfig(
        endpoints=(address,), max_retries=2, backoff_base_s=0.01, backoff_max_s=0.05
    )
    with TeacherClient(config) as client:
        client.connect(vocab_size=VOCAB)
        srv.stop()  # the only replica is gone; its port refuses connections
        spec = random_specs(gen, 1)[0]
        with pytest.raises(TeacherUnavailableError, match=r"no result after 3 attempts") as e:
            client.submit(spec).result(timeout=30)
    assert address in str(e.value)
    assert spec.request_id in str(e.value)
