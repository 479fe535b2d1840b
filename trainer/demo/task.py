"""The demo's synthetic task: reverse a sequence of symbols, with a verifiable reward.

A prompt is `<bos> x_1 … x_n <sep>` and the correct response is `x_n … x_1 <eos>`, over
an alphabet of `alphabet` symbol tokens inside a vocabulary of `vocab_size` ≥ 1,000 ids
(the tokenizer of teacher_service.random_model: <pad>=0 <bos>=1 <eos>=2 <unk>=3, then
"t4", "t5", …). The models predict over the whole vocabulary, so a top-K with K ≤ 64 truly
truncates their distributions. The reward is checked exactly against the known answer
(trainer.rewards built-ins `exact_match` and `token_accuracy` read meta["answer"]).

Reversal needs position-dependent attention (response token j looks at prompt token
n + 1 − j), so a model cannot solve it by a per-token lookup; small Llamas learn it in a
few hundred supervised steps on CPU.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

BOS, EOS = 1, 2
SEP = 4  # "t4": marks the end of the prompt
FIRST_SYMBOL = 5  # symbols are ids 5 .. 5 + alphabet - 1


@dataclass(frozen=True)
class TaskSpec:
    """The task's size; the vocabulary is the models' (only `alphabet` ids are symbols)."""

    vocab_size: int = 1024
    length: int = 6  # symbols per prompt
    # 32, not 64: the student's top-32 then covers every symbol, and from a near-random
    # start on-policy training gets going (with 64 it did not; docs/results.md).
    alphabet: int = 32

    def __post_init__(self) -> None:
        if FIRST_SYMBOL + self.alphabet > self.vocab_size:
            raise ValueError("alphabet does not fit in the vocabulary")

    @property
    def prompt_len(self) -> int:
        return self.length + 2  # <bos> x_1..x_n <sep>

    @property
    def response_len(self) -> int:
        return self.length + 1  # reversed symbols + <eos>


def make_example(rng: random.Random, spec: TaskSpec) -> dict:
    """{"prompt": [ids], "answer": [ids]} for one random symbol sequence."""
    xs = [FIRST_SYMBOL + rng.randrange(spec.alphabet) for _ in range(spec.length)]
    return {"prompt": [BOS, *xs, SEP], "answer": xs[::-1]}


def full_sequence(example: dict) -> list[int]:
    """Prompt + correct response + <eos>: what supervised training sees."""
    return [*example["prompt"], *example["answer"], EOS]


def write_prompts(path: str | Path, n: int, seed: int, spec: TaskSpec) -> Path:
    """n examples as JSONL (the trainer's data.prompts format)."""
    rng = random.Random(seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for _ in range(n):
            f.write(json.dumps(make_example(rng, spec)) + "\n")
    return out
