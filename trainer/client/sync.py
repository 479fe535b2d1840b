"""The synchronous teacher client: a facade over the async core on a loop thread.

`AsyncTeacherClient` (trainer/client/core.py) does the work on an asyncio loop;
`TeacherClient` here runs one on a background thread so that a synchronous rollout
loop can hand each finished sequence to the teacher at once and keep sampling:

    with TeacherClient(ClientConfig(endpoints=("teacher-0:50051", "teacher-1:50051"),
                                    client_id="run-42")) as teacher:
        teacher.connect(vocab_size=V, tokenizer_fingerprint=tokenizer_fingerprint(tok))
        futures = []
        for seq in rollouts():                      # student sampling continues ...
            futures.append(teacher.submit(ScoreSpec(seq.ids, seq.start, top_k=16)))
        scores = [f.result() for f in futures]      # ... while the teacher scores

Importing this module pulls in grpc, torch and the wire codec, never a teacher
backend or the server. See docs/client.md for options, retries and failover.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import torch

from trainer.client.core import AsyncTeacherClient
from trainer.client.errors import TeacherError
from trainer.client.types import ClientConfig, ScoreSpec, TeacherInfo, TeacherScores

T = TypeVar("T")


class TeacherClient:
    """Synchronous facade over AsyncTeacherClient; owns an event loop on a thread.

    Thread-safe: any thread may call `submit`, `score_batch` or `connect`. The
    returned futures resolve on the client's thread; `Future.cancel()` cancels the
    request.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="teacher-client", daemon=True
        )
        self._thread.start()
        self._client = self._run(self._make_client(config)).result()
        self._closed = False

    @staticmethod
    async def _make_client(config: ClientConfig) -> AsyncTeacherClient:
        return AsyncTeacherClient(config)  # built on the loop that will use it

    def _run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    @property
    def info(self) -> TeacherInfo | None:
        return self._client.info

    def connect(
        self, *, vocab_size: int | None = None, tokenizer_fingerprint: str | None = None
    ) -> TeacherInfo:
        """Handshake with every endpoint; raises HandshakeError on a mismatch."""
        return self._run(
            self._client.connect(vocab_size=vocab_size, tokenizer_fingerprint=tokenizer_fingerprint)
        ).result()

    def submit(self, spec: ScoreSpec) -> concurrent.futures.Future[TeacherScores]:
        """Starts scoring `spec` now and returns at once; the caller keeps working."""
        if self._closed:
            raise TeacherError("the teacher client is closed")
        spec.validate()  # a malformed spec raises here, in the caller's thread
        return self._run(self._client.score_spec(spec))

    def score(
        self,
        token_ids: torch.Tensor,
        start: int,
        top_k: int,
        *,
        query_ids: torch.Tensor | None = None,
        temperature: float = 1.0,
        logprob_dtype: torch.dtype = torch.float32,
        request_id: str | None = None,
    ) -> TeacherScores:
        """Scores one sequence and waits for the result."""
        spec = ScoreSpec(token_ids, start, top_k, query_ids, temperature, logprob_dtype, request_id)
        return self.submit(spec).result()

    def score_batch(self, seqs: Sequence[ScoreSpec]) -> list[TeacherScores]:
        """Scores sequences concurrently and waits; results in input order."""
        if self._closed:
            raise TeacherError("the teacher client is closed")
        return self._run(self._client.score_batch(seqs)).result()

    def close(self) -> None:
        """Closes the connections and stops the loop thread (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._shutdown()).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _shutdown(self) -> None:
        """Closes the client, then cancels what is left (e.g. requests sleeping in
        backoff) so that no caller waits forever on a future of a stopped loop."""
        await self._client.close()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)

    def __enter__(self) -> TeacherClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
