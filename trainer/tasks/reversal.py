"""Reversal: `<bos> x_1 … x_n <sep>` → `x_n … x_1 <eos>` (the demo's task, smaller).

Each response token copies a prompt symbol at a position-dependent offset, so the model
needs position-dependent attention; the teacher is trained on corrupted prefixes, so its
advice after a student's mistake is still the correct next symbol.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainer.tasks.base import BOS, FIRST_SYMBOL, SEP, SyntheticTask


@dataclass(frozen=True)
class ReversalTask(SyntheticTask):
    name: str = "reversal"
    length: int = 5

    @property
    def prompt_len(self) -> int:
        return self.length + 2

    @property
    def response_len(self) -> int:
        return self.length + 1

    def make_example(self, rng: random.Random) -> dict:
        xs = [FIRST_SYMBOL + rng.randrange(self.alphabet) for _ in range(self.length)]
        return {"prompt": [BOS, *xs, SEP], "answer": xs[::-1]}
