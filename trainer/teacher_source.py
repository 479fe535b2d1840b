"""Where a teacher's scores come from: a local model (full logits) or the teacher service.

Both sources take a training `Batch` and return a `TeacherOutput` in the same [B, T]
layout as the student's logits, through `submit(...) -> Pending` so that the student's
forward runs while the teacher scores; `Pending.result()` is the only place the trainer
waits (timed as the teacher-wait fraction).

- `LocalTeacher` (in-process, model_dir): runs a Hugging Face causal LM on a worker
  thread (torch releases the GIL in its ops). It can return full log-probs [B, T, V]
  (Dense support "full") or exactly what the service would (top-K, token, query,
  leftover), so tests and the demo can swap one for the other.
- `ServiceTeacher` (endpoints): one `TeacherClient` per teacher; one ScoreSpec per row,
  with the student's top-K ids as query ids when asked. The spec's TLS options, bearer
  token (token, token_file or the environment, see `TeacherSpec`) and the process's
  client id go to the client; refused credentials fail at start with `TeacherAuthError`.

The handshake is the same for both: a teacher whose vocabulary size or tokenizer
fingerprint differs from the student's fails at start, saying what differs.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacher_service.backends.logprob_rows import summarize_rows
from teacher_service.fingerprint import tokenizer_fingerprint
from trainer.config import TeacherSpec
from trainer.rollout import Batch, ResponseLogits


@dataclass(frozen=True)
class TeacherOutput:
    """One teacher's scores of a batch; shapes follow the student's [B, T] layout.

    Attributes:
        token_logprobs: float32 [B, T] log q(y_t | s_t) (0 on padding).
        topk_ids: int64 [B, T, Kt] the teacher's top-K (-1 on padding), or None (full).
        topk_logprobs: float32 [B, T, Kt], or None.
        query_logprobs: float32 [B, T, Q] log q at the query ids, or None.
        leftover_logmass: float32 [B, T] log(1 − Σ_topK q), or None.
        full_logprobs: float32 [B, T, V] every log q (local teacher, support "full").
    """

    token_logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    query_logprobs: torch.Tensor | None = None
    leftover_logmass: torch.Tensor | None = None
    full_logprobs: torch.Tensor | None = None


class Pending:
    """A submitted scoring job; result() blocks and records how long it blocked."""

    def __init__(self, wait: Callable[[], TeacherOutput]) -> None:
        self._wait = wait
        self.waited_s = 0.0

    def result(self) -> TeacherOutput:
        t0 = time.perf_counter()
        try:
            return self._wait()
        finally:
            self.waited_s += time.perf_counter() - t0


class TeacherAuthError(RuntimeError):
    """The teacher service refused this trainer's credentials (UNAUTHENTICATED)."""


def check_handshake(name: str, vocab: int, fp: str, student_vocab: int, student_fp: str) -> None:
    """Raises RuntimeError naming what differs between teacher and student."""
    if vocab != student_vocab:
        raise RuntimeError(
            f"teacher {name!r}: vocab size {vocab} differs from the student's {student_vocab}"
        )
    if fp != student_fp:
        raise RuntimeError(
            f"teacher {name!r}: tokenizer fingerprint {fp[:12]}.. differs from the "
            f"student's {student_fp[:12]}.."
        )


class LocalTeacher:
    """An in-process teacher: a causal-LM directory run on a worker thread."""

    def __init__(self, spec: TeacherSpec, device: torch.device) -> None:
        self.spec = spec
        path = Path(spec.model_dir)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        self._model = ResponseLogits(lm.to(device).eval())
        self.vocab_size = int(lm.config.vocab_size)
        self.fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(path))
        self._device = device
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="teacher")

    def submit(
        self, batch: Batch, top_k: int, query_ids: torch.Tensor | None, full: bool
    ) -> Pending:
        """Scores `batch` on the worker thread. query_ids: int64 [B, T, Q] or None."""
        future = self._pool.submit(self._score, batch, top_k, query_ids, full)
        return Pending(future.result)

    @torch.no_grad()
    def _score(
        self, batch: Batch, top_k: int, query_ids: torch.Tensor | None, full: bool
    ) -> TeacherOutput:
        logits = self._model(batch.input_ids.to(self._device), batch.positions.to(self._device))
        mask = batch.mask.bool()
        if full:
            lq = torch.log_softmax(logits.float(), dim=-1).cpu()  # [B, T, V]
            token = lq.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
            return TeacherOutput(token_logprobs=torch.where(mask, token, 0.0), full_logprobs=lq)
        # The same row maths as the service's backends, so both teachers agree exactly.
        B, T, V = logits.shape
        n = B * T
        rows = summarize_rows(
            logits.reshape(n, V),
            batch.targets.reshape(n).to(self._device),
            torch.full((n,), top_k, device=self._device),
            torch.ones(n, device=self._device),
            None if query_ids is None else query_ids.reshape(n, -1).clamp_min(0).to(self._device),
        )
        token = torch.where(mask, rows.token_logprobs.view(B, T).cpu(), 0.0)
        top_ids = torch.where(mask.unsqueeze(-1), rows.topk_ids.view(B, T, -1).cpu(), -1)
        top_lp = rows.topk_logprobs.view(B, T, -1).cpu()
        leftover = rows.leftover_logmass.view(B, T).cpu()
        query = None if rows.query_logprobs is None else rows.query_logprobs.view(B, T, -1).cpu()
        return TeacherOutput(token, top_ids, top_lp, query, leftover)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ServiceTeacher:
    """A teacher behind the teacher service, through the trainer's TeacherClient."""

    def __init__(self, spec: TeacherSpec, client_id: str) -> None:
        # grpc only when a service is used
        from trainer.client import ClientConfig, TeacherClient, TlsOptions

        self.spec = spec
        tls = None
        if spec.uses_tls:
            tls = TlsOptions(
                ca_cert=Path(spec.ca_cert) if spec.ca_cert else None,
                client_cert=Path(spec.client_cert) if spec.client_cert else None,
                client_key=Path(spec.client_key) if spec.client_key else None,
                server_name=spec.server_name or None,
            )
        self._token = spec.bearer_token()
        self._client = TeacherClient(
            ClientConfig(
                endpoints=tuple(spec.endpoints),
                teacher=spec.teacher,
                client_id=client_id,
                token=self._token,
                tls=tls,
                deadline_s=spec.deadline_s,
                resolve_interval_s=spec.resolve_interval_s,
            )
        )
        self.vocab_size = 0
        self.fingerprint = ""

    def connect(self, student_vocab: int, student_fp: str) -> None:
        """Handshake: the client raises HandshakeError naming what differs; refused
        credentials raise TeacherAuthError saying which token was sent."""
        import grpc

        from trainer.client import TeacherError

        try:
            info = self._client.connect(vocab_size=student_vocab, tokenizer_fingerprint=student_fp)
        except TeacherError as exc:
            if exc.code != grpc.StatusCode.UNAUTHENTICATED:
                raise
            spec = self.spec
            if self._token is None:
                sent = (
                    "no bearer token was sent; set the teacher's token_file (or token), "
                    "or the HYBRID_DISTILL_AUTH_TOKEN environment variable"
                )
            elif spec.token_file:
                sent = f"the bearer token read from token_file {spec.token_file} was refused"
            else:
                sent = "the bearer token (token or HYBRID_DISTILL_AUTH_TOKEN) was refused"
            raise TeacherAuthError(
                f"teacher {spec.name!r} at {list(spec.endpoints)}: the service refused the "
                f"credentials ({exc}): {sent}"
            ) from exc
        self.vocab_size, self.fingerprint = info.vocab_size, info.tokenizer_fingerprint

    def submit(
        self, batch: Batch, top_k: int, query_ids: torch.Tensor | None, full: bool
    ) -> Pending:
        """One ScoreSpec per row (prompt + response, start = prompt length)."""
        if full:
            raise ValueError("the teacher service returns top-K, not full log-probs")
        from trainer.client import ScoreSpec

        lengths = batch.mask.sum(-1).to(torch.int64).tolist()
        futures = []
        for b, n in enumerate(lengths):
            start = int(batch.starts[b])
            q = None if query_ids is None or n == 0 else query_ids[b, :n]
            ids = batch.input_ids[b, : start + max(n, 1)]
            futures.append(self._client.submit(ScoreSpec(ids, start, top_k, query_ids=q)))
        return Pending(lambda: _assemble(batch, top_k, query_ids, futures, lengths))

    def close(self) -> None:
        self._client.close()


def _assemble(
    batch: Batch,
    top_k: int,
    query_ids: torch.Tensor | None,
    futures: Sequence[concurrent.futures.Future],
    lengths: Sequence[int],
) -> TeacherOutput:
    """Per-row TeacherScores -> padded [B, T] tensors."""
    B, T = batch.mask.shape
    token = torch.zeros(B, T)
    ids = torch.full((B, T, top_k), -1, dtype=torch.int64)
    lps = torch.zeros(B, T, top_k)
    left = torch.zeros(B, T)
    query = None if query_ids is None else torch.zeros(query_ids.shape)
    for b, (fut, n) in enumerate(zip(futures, lengths, strict=True)):
        s = fut.result()
        if n == 0:
            continue
        token[b, :n] = s.token_logprobs[:n]
        kt = s.topk_ids.shape[-1]
        ids[b, :n, :kt] = s.topk_ids[:n]
        lps[b, :n, :kt] = s.topk_logprobs[:n]
        left[b, :n] = s.leftover_logmass[:n]
        if query is not None and s.query_logprobs is not None:
            query[b, :n] = s.query_logprobs[:n]
    return TeacherOutput(token, ids, lps, query, left)


def open_teachers(
    specs: Sequence[TeacherSpec],
    device: torch.device,
    student_vocab: int,
    student_fp: str,
    client_id: str,
) -> list[LocalTeacher | ServiceTeacher]:
    """Builds and handshakes every configured teacher; on a failure closes the ones
    already opened before raising."""
    teachers: list[LocalTeacher | ServiceTeacher] = []
    try:
        for spec in specs:
            if spec.model_dir:
                t: LocalTeacher | ServiceTeacher = LocalTeacher(spec, device)
                teachers.append(t)
                check_handshake(spec.name, t.vocab_size, t.fingerprint, student_vocab, student_fp)
            else:
                t = ServiceTeacher(spec, client_id)
                teachers.append(t)
                t.connect(student_vocab, student_fp)
    except BaseException:
        for t in teachers:
            t.close()
        raise
    return teachers
