"""What a synthetic experiment task is: prompts, a verifiable answer, and the teacher's data.

A task draws examples `{"prompt": [ids], "answer": [ids]}` over the word-level vocabulary
of `teacher_service.random_model` (<pad>=0 <bos>=1 <eos>=2 <unk>=3, then symbols). The
reward is checked against the known answer with the trainer's built-ins (`REWARDS`:
0.5·token_accuracy + 0.5·exact_match, as in the demo). `teacher_answer` is what the
project's teacher is *trained* to answer: the true answer, except for the task whose
teacher is wrong on purpose (flawed.py). `corrupt` is the teacher's corrupted-prefix
rate (trainer/demo/teacher_pretrain.py explains why).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

BOS, EOS = 1, 2
SEP = 4  # "t4": ends every prompt
FIRST_SYMBOL = 5  # symbols are ids 5, 6, ...

REWARDS = (("token_accuracy", 0.5), ("exact_match", 0.5))


@dataclass(frozen=True)
class SyntheticTask:
    """Base class: subclasses set the sizes and implement `make_example`."""

    name: str = "task"
    vocab_size: int = 256
    alphabet: int = 16  # symbol ids FIRST_SYMBOL .. FIRST_SYMBOL + alphabet - 1
    corrupt: float = 0.5  # teacher pre-training: max per-sequence corruption rate
    teacher_steps: int = 300  # teacher pre-training steps (batch 64)

    def __post_init__(self) -> None:
        if FIRST_SYMBOL + self.alphabet > self.vocab_size:
            raise ValueError(f"{self.name}: alphabet {self.alphabet} does not fit in the vocab")

    @property
    def prompt_len(self) -> int:
        raise NotImplementedError

    @property
    def response_len(self) -> int:
        """Answer tokens + <eos>."""
        raise NotImplementedError

    def make_example(self, rng: random.Random) -> dict:
        raise NotImplementedError

    def teacher_answer(self, example: dict, rng: random.Random) -> list[int]:
        """What the teacher is trained to answer (the true answer unless overridden)."""
        return list(example["answer"])

    def shuffled_answer(self, example: dict, rng: random.Random) -> list[int]:
        """The correct answer's tokens in a random order: the student's warm start (right
        format and symbols, wrong order; docs/results.md says why not random symbols)."""
        out = list(example["answer"])
        rng.shuffle(out)
        return out
