"""Maximum connection age: the server sends GOAWAY to old connections and cuts streams
still open on them after the grace period, so that clients reconnect (and re-resolve)
and replicas added by an autoscaler get load. Flags reach the config and bad values are
refused naming the flag.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest

from teacher_service.config import parse_args
from teacher_service.server import ThreadedServer
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from tests.teacher_service.conftest import start_thread_server


def test_connection_age_flags_reach_the_config() -> None:
    age, grace = random.uniform(1, 1000), random.uniform(0, 100)
    config = parse_args(
        [
            "--model",
            "m",
            "--max-connection-age-seconds",
            str(age),
            "--max-connection-age-grace-seconds",
            str(grace),
        ],
        env={},
    )
    assert (config.max_connection_age_s, config.max_connection_age_grace_s) == (age, grace)
    defaults = parse_args(["--model", "m"], env={})
    # On by default: without it a replica the autoscaler adds gets no load from clients
    # that keep one long-lived connection.
    assert defaults.max_connection_age_s > 0 and defaults.max_connection_age_grace_s > 0


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-connection-age-seconds", "-1"),
        ("--max-connection-age-seconds", "nan"),
        ("--max-connection-age-grace-seconds", "-0.5"),
        ("--max-connection-age-grace-seconds", "3e6"),
    ],
)
def test_bad_connection_age_is_refused_naming_the_flag(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", flag, value], env={})
    assert f"{flag} must be in [0, 2000000.0], got {float(value)}" in capsys.readouterr().err


async def _stream_until_cut(address: str, cut: asyncio.Event) -> grpc.aio.AioRpcError | None:
    """Opens a ScoreStream and waits until the server ends it (returns the error) or
    until `cut` is set (returns None: the stream was still open)."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.TeacherServiceStub(channel).ScoreStream()
        await channel.channel_ready()
        read = asyncio.ensure_future(call.read())
        stop = asyncio.ensure_future(cut.wait())
        try:
            done, _ = await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
            if read in done:
                try:
                    read.result()
                except grpc.aio.AioRpcError as error:
                    return error
                raise AssertionError("the stream ended without an error")
            return None
        finally:
            read.cancel()
            stop.cancel()
            call.cancel()


def test_an_aged_connection_is_cut_after_its_grace_and_an_unaged_one_lives(
    tiny_model_dir: Path,
) -> None:
    aged = start_thread_server(
        ("tiny", tiny_model_dir), max_connection_age_s=0.5, max_connection_age_grace_s=0.5
    )
    forever = start_thread_server(("tiny", tiny_model_dir), max_connection_age_s=0.0)

    async def run() -> tuple[grpc.aio.AioRpcError | None, grpc.aio.AioRpcError | None]:
        cut = asyncio.Event()
        survivor = asyncio.ensure_future(_stream_until_cut(forever.address, cut))
        # The stream on the aged server ends once age + grace are over; at that moment
        # the stream opened earlier on the server without an age must still be open.
        victim = await asyncio.wait_for(_stream_until_cut(aged.address, asyncio.Event()), 60)
        cut.set()
        return victim, await survivor

    servers: list[ThreadedServer] = [aged, forever]
    try:
        victim, survivor = asyncio.run(run())
    finally:
        for server in servers:
            server.stop()
    assert victim is not None and victim.code() == grpc.StatusCode.UNAVAILABLE, victim
    assert "max connection age" in (victim.details() or ""), victim.details()
    assert survivor is None, f"the connection without a maximum age was cut: {survivor}"
