"""PyTorch/transformers teacher backend: any local Hugging Face causal-LM directory.

The embedded default (runs on CPU; CUDA when asked). A batch is right-padded into one
forward through the *base* model, which yields hidden states [B, L, H]; only the rows
that are scored (positions start-1 .. L-2 of each item) are gathered, and they go
through the LM head in chunks of `chunk_rows`, so the batch never materialises
[B, L, V] float32 logits. All model work runs on one executor thread: the event loop
stays free to accept requests while a batch computes.

Models whose head is more than a linear layer (final logit soft-capping, logit scaling)
take the plain path: full logits per item, chunked over the items.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacher_service.backends.health import DEFAULT_MAX_FAILED_BATCHES, FailureStreak
from teacher_service.backends.logprob_rows import RowScores, summarize_rows
from teacher_service.fingerprint import tokenizer_fingerprint
from teacher_service.types import ScoreItem, ScoreResult, TeacherMeta

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bytes of float32 logits one chunk may hold: bounds peak memory independently of V.
DEFAULT_CHUNK_BYTES = 256 * 1024 * 1024


def directory_revision(path: Path, samples_per_file: int = 64, block: int = 65536) -> str:
    """A short content hash of a model directory: config, weight headers and sampled weights.

    Hashing every weight byte of a 70B model would delay start-up by minutes. Instead
    each safetensors file contributes its header (names, shapes, dtypes, offsets), its
    size, and `samples_per_file` blocks spread evenly over its data, so two checkpoints
    of one architecture with different weights get different revisions.
    """
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix == ".safetensors":
            size = file.stat().st_size
            digest.update(f"{file.name}:{size}".encode())
            with file.open("rb") as handle:
                header_len = int.from_bytes(handle.read(8), "little")
                digest.update(handle.read(min(header_len, 64 * 1024 * 1024)))
                data_start = 8 + header_len
                span = max(0, size - data_start - block)
                for i in range(samples_per_file):
                    handle.seek(data_start + span * i // max(1, samples_per_file - 1))
                    digest.update(handle.read(block))
    return digest.hexdigest()[:16]


class TorchBackend:
    """Scores batches with a transformers causal LM.

    Args:
        model_dir: local directory with config.json, *.safetensors and a tokenizer.
        device: "cpu", "cuda" or "cuda:N".
        dtype: "float32", "bfloat16" or "float16" (weights; log-probs are float32).
        max_sequence_length: override of the model's max_position_embeddings.
        chunk_bytes: float32 logits bytes per LM-head chunk.
        max_failed_batches: batches failing in a row after which `dead_reason` says
            the backend is broken (liveness fails; see backends/health.py).
    """

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "cpu",
        dtype: str = "float32",
        max_sequence_length: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_failed_batches: int = DEFAULT_MAX_FAILED_BATCHES,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self._dir = Path(model_dir)
        if not (self._dir / "config.json").is_file():
            raise FileNotFoundError(f"{self._dir} is not a model directory (no config.json)")
        self._device = torch.device(device)
        self._dtype = _DTYPES[dtype]
        self._max_len_override = max_sequence_length
        self._chunk_bytes = chunk_bytes
        # One thread: torch already parallelises inside an op, and a single thread keeps
        # batches strictly ordered and the model's memory use predictable.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-backend")
        self._model: torch.nn.Module | None = None
        self._meta: TeacherMeta | None = None
        self._plain_head = False
        self._failures = FailureStreak(max_failed_batches, "torch")

    # -- Backend protocol ------------------------------------------------------------

    @property
    def meta(self) -> TeacherMeta:
        if self._meta is None:
            raise RuntimeError("backend not started")
        return self._meta

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        warm = ScoreItem(torch.zeros(2, dtype=torch.int64), start=1, top_k=1)
        await self.score([warm])
        log.info("torch backend ready: %s on %s (%s)", self._dir, self._device, self._dtype)

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._score_sync, list(items))
        except Exception as exc:
            self._failures.failed(exc)
            raise
        self._failures.succeeded()
        return results

    def dead_reason(self) -> str | None:
        return self._failures.reason()

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._model = None

    # -- loading -----------------------------------------------------------------------

    def _load(self) -> None:
        model = AutoModelForCausalLM.from_pretrained(self._dir, dtype=self._dtype)
        model.to(self._device).eval()
        tokenizer = AutoTokenizer.from_pretrained(self._dir)
        config = model.config
        head = model.get_output_embeddings()
        vocab = int(head.weight.shape[0])
        max_len = self._max_len_override or int(
            getattr(config, "max_position_embeddings", 0) or 4096
        )
        # Heads with extra maths after the matmul must go through the model's forward.
        self._plain_head = bool(
            getattr(config, "final_logit_softcapping", None)
            or getattr(config, "logit_scale", None)
            or not isinstance(head, torch.nn.Linear)
        )
        self._model = model
        self._meta = TeacherMeta(
            model_name=self._dir.name,
            revision=directory_revision(self._dir),
            vocab_size=vocab,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            max_sequence_length=max_len,
            backend="torch",
            supports_query_ids=True,
        )

    # -- scoring -----------------------------------------------------------------------

    @torch.inference_mode()
    def _score_sync(self, items: list[ScoreItem]) -> list[ScoreResult]:
        assert self._model is not None
        hidden = self._scored_rows(items)  # [sum R, H] or [sum R, V] on the plain path
        row_k, row_temp, targets = self._row_tables(items)
        vocab = self.meta.vocab_size
        chunk = max(1, self._chunk_bytes // (4 * vocab))
        head = self._model.get_output_embeddings()
        queries = self._padded_queries(items)

        per_chunk = []
        for lo in range(0, hidden.shape[0], chunk):
            hi = min(lo + chunk, hidden.shape[0])
            logits = hidden[lo:hi] if self._plain_head else head(hidden[lo:hi])
            per_chunk.append(
                summarize_rows(
                    logits,
                    targets[lo:hi].to(self._device),
                    row_k[lo:hi].to(self._device),
                    row_temp[lo:hi].to(self._device),
                    queries[lo:hi].to(self._device) if queries is not None else None,
                )
            )
        return self._split(items, per_chunk)

    def _scored_rows(self, items: list[ScoreItem]) -> torch.Tensor:
        """Hidden states (or logits on the plain path) of every scored position, in order.

        Returns [sum R, H]: item i contributes its rows start-1 .. L-2.
        """
        assert self._model is not None
        if self._plain_head:
            rows = []
            for item in items:
                ids = item.token_ids[None].to(self._device)
                logits = self._model(input_ids=ids, use_cache=False).logits[0]
                rows.append(logits[item.start - 1 : item.length - 1])
            return torch.cat(rows)
        lengths = [item.length for item in items]
        ids = torch.zeros(len(items), max(lengths), dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for b, item in enumerate(items):
            ids[b, : item.length] = item.token_ids
            mask[b, : item.length] = 1
        # use_cache=False: scoring is one forward; a KV cache would be built and thrown away.
        out = self._model.base_model(
            input_ids=ids.to(self._device), attention_mask=mask.to(self._device), use_cache=False
        )
        states = out.last_hidden_state  # [B, L, H]
        return torch.cat(
            [states[b, item.start - 1 : item.length - 1] for b, item in enumerate(items)]
        )

    @staticmethod
    def _row_tables(
        items: list[ScoreItem],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row top-K, temperature and target token, each [sum R]."""
        counts = torch.tensor([item.num_rows for item in items])
        row_k = torch.repeat_interleave(torch.tensor([item.top_k for item in items]), counts)
        row_temp = torch.repeat_interleave(
            torch.tensor([item.temperature for item in items], dtype=torch.float32), counts
        )
        targets = torch.cat([item.token_ids[item.start :] for item in items])
        return row_k, row_temp, targets

    @staticmethod
    def _padded_queries(items: list[ScoreItem]) -> torch.Tensor | None:
        """Every row's query ids, padded to the widest Q with id 0: [sum R, Q] or None."""
        widths = [item.query_ids.shape[1] for item in items if item.query_ids is not None]
        if not widths:
            return None
        padded = torch.zeros(sum(item.num_rows for item in items), max(widths), dtype=torch.int64)
        row = 0
        for item in items:
            if item.query_ids is not None:
                padded[row : row + item.num_rows, : item.query_ids.shape[1]] = item.query_ids
            row += item.num_rows
        return padded

    @staticmethod
    def _split(items: list[ScoreItem], per_chunk: list[RowScores]) -> list[ScoreResult]:
        """Concatenates chunk results and cuts them back into one result per item."""
        topk_ids = torch.cat([c.topk_ids for c in per_chunk]).cpu()
        topk_lp = torch.cat([c.topk_logprobs for c in per_chunk]).cpu()
        token_lp = torch.cat([c.token_logprobs for c in per_chunk]).cpu()
        leftover = torch.cat([c.leftover_logmass for c in per_chunk]).cpu()
        query_lp = None
        if per_chunk[0].query_logprobs is not None:  # all chunks share the padded width
            query_lp = torch.cat([c.query_logprobs for c in per_chunk]).cpu()
        results = []
        row = 0
        for item in items:
            rows = slice(row, row + item.num_rows)
            k = item.top_k
            query = None
            if item.query_ids is not None and query_lp is not None:
                query = query_lp[rows, : item.query_ids.shape[1]].clone()
            results.append(
                ScoreResult(
                    topk_ids=topk_ids[rows, :k].to(torch.int32),
                    topk_logprobs=topk_lp[rows, :k].clone(),
                    token_logprobs=token_lp[rows].clone(),
                    query_logprobs=query,
                    leftover_logmass=leftover[rows].clone(),
                )
            )
            row += item.num_rows
        return results
