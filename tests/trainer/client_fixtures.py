"""Helpers for the teacher-client tests: random models, real servers, reference scores.

Servers are real: `thread_server` runs one in this process (port 0 on 127.0.0.1);
`ServerProcess` runs `python -m teacher_service.server` as a child process so that a
test can SIGKILL it mid-run. References are computed with the server's own backend
class (TorchBackend) or with a plain transformers forward, never with the client.

Test modules import the fixtures they need:

    from tests.trainer.client_fixtures import model_dir  # noqa: F401
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_service.backends.torch_backend import TorchBackend
from teacher_service.config import ModelSpec, ServerConfig
from teacher_service.random_model import save_random_model
from teacher_service.server import ThreadedServer, serve_in_thread
from teacher_service.types import ScoreItem, ScoreResult
from trainer.client import ScoreSpec

VOCAB = 1000
MAX_POSITIONS = 256
_MODELS: dict[int, Path] = {}  # seed -> directory, shared by every module of the session


def build_model(root: Path, seed: int) -> Path:
    """A 2-layer hidden-32 Llama with V = 1000 (built once per seed and session)."""
    if seed not in _MODELS:
        _MODELS[seed] = save_random_model(
            root / f"model-{seed}",
            VOCAB,
            hidden=32,
            layers=2,
            heads=4,
            max_positions=MAX_POSITIONS,
            seed=seed,
        )
    return _MODELS[seed]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.getbasetemp(), seed=11)


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and vocabulary as `model_dir`, different weights."""
    return build_model(tmp_path_factory.getbasetemp(), seed=12)


def server_config(model: Path, name: str = "teacher", **overrides: object) -> ServerConfig:
    """A ServerConfig on 127.0.0.1 with free ports and no grace period."""
    fields: dict[str, object] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "grace_seconds": 0.0,
    }
    fields.update(overrides)
    return ServerConfig(models=(ModelSpec(name, model),), **fields)  # type: ignore[arg-type]


def thread_server(model: Path, **overrides: object) -> ThreadedServer:
    return serve_in_thread(server_config(model, **overrides))


class ServerProcess:
    """A teacher server in a child process; `kill()` is SIGKILL (no drain, no goodbye).

    The constructor only spawns it (start several at once), `wait_ready()` waits.
    """

    def __init__(self, model: Path, *args: str, name: str = "teacher", timeout_s: float = 120):
        self._log = Path(os.environ.get("TMPDIR", "/tmp")) / f"teacher-{os.getpid()}-{id(self)}.log"
        cmd = [
            sys.executable, "-m", "teacher_service.server", "--model", f"{name}={model}",
            "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
            "--grace-seconds", "0", *args,
        ]  # fmt: skip
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self._timeout_s = timeout_s
        self.grpc_port = 0

    def wait_ready(self) -> ServerProcess:
        """Blocks until the server logs its bound port (it is then ready)."""
        deadline = time.monotonic() + self._timeout_s
        while time.monotonic() < deadline:
            match = re.search(r"serving grpc_port=(\d+)", self._log.read_text(errors="replace"))
            if match:
                self.grpc_port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"teacher server did not start:\n{self._log.read_text()[-3000:]}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` (SIGTERM drains first, SIGKILL does not) and waits for the exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        self.proc.wait(timeout=60)

    def close(self) -> None:
        self.kill()
        self._log.unlink(missing_ok=True)


def random_specs(
    gen: torch.Generator,
    n: int,
    *,
    min_len: int = 4,
    max_len: int = 64,
    top_k: int = 8,
    query: bool = False,
    temperature: float = 1.0,
    logprob_dtype: torch.dtype = torch.float32,
) -> list[ScoreSpec]:
    """`n` random sequences in [0, VOCAB) with random starts and unique request ids."""
    specs = []
    for i in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        start = int(torch.randint(1, length, (1,), generator=gen))
        query_ids = None
        if query:
            q = int(torch.randint(1, 6, (1,), generator=gen))
            query_ids = torch.randint(0, VOCAB, (length - start, q), generator=gen)
        specs.append(
            ScoreSpec(ids, start, top_k, query_ids, temperature, logprob_dtype,
                      request_id=f"seq-{i}-{int(torch.randint(0, 2**31, (1,), generator=gen))}")
        )  # fmt: skip
    return specs


def backend_scores(model: Path, specs: Sequence[ScoreSpec]) -> list[ScoreResult]:
    """The server's own backend scoring each spec alone (a batch of one), float32."""

    async def run() -> list[ScoreResult]:
        backend = TorchBackend(model)
        await backend.start()
        try:
            results = []
            for spec in specs:
                item = ScoreItem(
                    spec.token_ids.long(), spec.start, spec.top_k,
                    None if spec.query_ids is None else spec.query_ids.long(), spec.temperature,
                )  # fmt: skip
                results.extend(await backend.score([item]))
            return results
        finally:
            await backend.close()

    return asyncio.run(run())


class ReferenceModel:
    """Plain transformers forward: full float32 log-softmax rows of a sequence."""

    def __init__(self, model: Path) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    @torch.inference_mode()
    def rows(self, spec: ScoreSpec) -> torch.Tensor:
        """float32 [R, V]: row r is log_softmax(logits at position start + r - 1 / T)."""
        return self.rows_many([spec])[0]

    @torch.inference_mode()
    def rows_many(self, specs: Sequence[ScoreSpec], chunk: int = 64) -> list[torch.Tensor]:
        """`rows` for many specs, in right-padded batches (a forward per sequence costs
        far more on a loaded CI machine than the maths; padding after the last token
        does not change causal logits beyond float noise)."""
        out: list[torch.Tensor] = []
        for lo in range(0, len(specs), chunk):
            group = specs[lo : lo + chunk]
            width = max(int(s.token_ids.shape[0]) for s in group)
            ids = torch.zeros(len(group), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, spec in enumerate(group):
                ids[b, : spec.token_ids.shape[0]] = spec.token_ids
                mask[b, : spec.token_ids.shape[0]] = 1
            logits = self.model(input_ids=ids, attention_mask=mask).logits  # [B, L, V]
            for b, spec in enumerate(group):
                end = int(spec.token_ids.shape[0]) - 1
                scaled = logits[b, spec.start - 1 : end] / spec.temperature
                out.append(torch.log_softmax(scaled.float(), -1))
        return out


def assert_matches_reference(scores: object, spec: ScoreSpec, rows: torch.Tensor) -> None:
    """Checks a TeacherScores against reference rows [R, V] up to batching noise.

    Ids are checked through the reference log-probs at the returned ids (robust to
    near-ties in the top-K order); the actual-token log-probs directly.
    """
    atol = 2e-4
    ids = spec.token_ids.long()
    torch.testing.assert_close(
        scores.topk_logprobs, rows.gather(1, scores.topk_ids), atol=atol, rtol=0
    )
    torch.testing.assert_close(
        scores.topk_logprobs, rows.topk(spec.top_k, dim=-1).values, atol=atol, rtol=0
    )
    torch.testing.assert_close(
        scores.token_logprobs, rows.gather(1, ids[spec.start :, None])[:, 0], atol=atol, rtol=0
    )


@pytest.fixture
def server(model_dir: Path) -> Iterator[ThreadedServer]:
    """A fresh in-process server on `model_dir`."""
    srv = thread_server(model_dir)
    try:
        yield srv
    finally:
        srv.stop()
