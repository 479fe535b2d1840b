"""The teacher client: what a training job imports to score its rollouts.

The public surface is the names below; everything else in this package (streams,
balancing, retries, the wire) is an implementation detail that may change:

    from trainer.client import ClientConfig, ScoreSpec, TeacherClient

    with TeacherClient(ClientConfig(endpoints=("127.0.0.1:50051",), client_id="run-1")) as t:
        t.connect(vocab_size=V)                       # fails here if the teacher differs
        scores = t.score_batch([ScoreSpec(ids, start, top_k=16) for ids, start in batch])

`TeacherClient` is synchronous (a loop on a background thread); `AsyncTeacherClient`
is the same client for an asyncio program. Importing this package pulls in grpc,
torch and the wire codec, never a teacher backend or the server. docs/client.md has
the options, the retry and failover rules, and a tested example.

Modules: sync.py (TeacherClient), core.py (AsyncTeacherClient), types.py (config,
specs, results), errors.py (exceptions), stream.py (one endpoint's ScoreStream),
balance.py (replica choice), retry.py (what is retried, backoff), handshake.py
(Info checks), wire.py (requests and responses <-> tensors).
"""

from trainer.client.core import AsyncTeacherClient
from trainer.client.errors import (
    HandshakeError,
    TeacherDeadlineError,
    TeacherError,
    TeacherRequestError,
    TeacherUnavailableError,
)
from trainer.client.sync import TeacherClient
from trainer.client.types import (
    ClientConfig,
    ScoreSpec,
    TeacherInfo,
    TeacherScores,
    TlsOptions,
)

__all__ = [
    "AsyncTeacherClient",
    "ClientConfig",
    "HandshakeError",
    "ScoreSpec",
    "TeacherClient",
    "TeacherDeadlineError",
    "TeacherError",
    "TeacherInfo",
    "TeacherRequestError",
    "TeacherScores",
    "TeacherUnavailableError",
    "TlsOptions",
]
