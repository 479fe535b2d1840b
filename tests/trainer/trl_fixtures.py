"""Shared set-up for the TRL integration tests (no tests here).

Models are the training-loop tests' tiny random Llamas (V = 256, one tokenizer); prompts
are the demo task's (trainer/demo/task.py: reverse a symbol sequence) over that
vocabulary; the teacher is a real `teacher_service.server` process on loopback.
"""

from __future__ import annotations

import random
import re
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.trainer.client_fixtures import ServerProcess
from tests.trainer.test_train_fixtures import VOCAB
from trainer.demo.task import FIRST_SYMBOL, TaskSpec, make_example

SPEC = TaskSpec(vocab_size=VOCAB, length=3, alphabet=96)


def demo_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """n demo-task rows for a TRL dataset: "prompt" text (the word-level tokenizer maps
    "<bos> t5 t9 t4" back to [1, 5, 9, 4]), "prompt_ids" and "answer"."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ex = make_example(rng, SPEC)
        text = " ".join("<bos>" if i == 1 else f"t{i}" for i in ex["prompt"])
        rows.append({"prompt": text, "prompt_ids": ex["prompt"], "answer": ex["answer"]})
    return rows


def grpo_args(out: Path, **overrides: Any) -> Any:
    """A GRPOConfig for fp32 CPU tests: no bf16, no checkpointing, no reporting."""
    from trl import GRPOConfig

    fields: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "beta": 0.0,
        "lr_scheduler_type": "constant",
        "max_grad_norm": 0.0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    fields.update(overrides)
    return GRPOConfig(**fields)


def symbol_fraction(prompt: Sequence[int], response: Sequence[int], meta: Mapping) -> float:
    """A format reward on the demo task: the fraction of the response's tokens (stop token
    excluded) that are symbols of SPEC's alphabet. From a random student it starts near
    alphabet / V and a few RL steps raise it, so a short CI run shows learning."""
    stops = meta.get("_stop_ids", (2,))
    body = list(response[:-1] if response and response[-1] in stops else response)
    lo, hi = FIRST_SYMBOL, FIRST_SYMBOL + SPEC.alphabet
    return sum(lo <= t < hi for t in body) / max(len(body), 1)


def http_port(server: ServerProcess) -> int:
    """The HTTP side port a ServerProcess logged next to its gRPC port."""
    match = re.search(r"serving grpc_port=\d+ http_port=(\d+)", server._log.read_text())
    assert match, "the server did not log its ports"
    return int(match.group(1))


def client_ids_seen(server: ServerProcess) -> set[str]:
    """The `client` labels of teacher_service_client_tokens_total on the server's /metrics."""
    url = f"http://127.0.0.1:{http_port(server)}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    return set(re.findall(r'teacher_service_client_tokens_total\{client="([^"]*)"\}', text))
