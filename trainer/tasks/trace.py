"""Prefix-sum trace: a long response (25 tokens) written as a small program's trace.

Prompt `<bos> d_1 … d_n <sep>` with digits d_i ∈ 0..9 (symbol ids 5..14); the answer
writes, for i = 1..n, the digit read and the running sum mod 10:

    d_1 s_1 d_2 s_2 … d_n s_n <eos>,   s_i = (s_{i−1} + d_i) mod 10,  s_0 = 0

With n = 12 that is 24 answer tokens + <eos>. Every s_i depends on all earlier ones, so
an early mistake spoils the rest of the answer (the reward counts positions against the
true trace): the future costs of a token are what γ > 0 credits it with. The teacher is
trained with teacher forcing (corrupt = 0): after a student's mistake it continues the
trace consistently from the written prefix, which is the teacher such traces get.

`sums_apart` writes the running sums with their own ten symbols (ids 15..24) instead of
the digits' ids 5..14. With shared ids a student must tell from its position alone
whether the next token is a digit to copy or a sum to compute (the parity of its distance
from <sep>); docs/results.md § "Why trace is slow" measures what that costs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainer.tasks.base import BOS, FIRST_SYMBOL, SEP, SyntheticTask


@dataclass(frozen=True)
class TraceTask(SyntheticTask):
    name: str = "trace"
    alphabet: int = 10
    digits: int = 12
    corrupt: float = 0.0
    teacher_steps: int = 2000  # 400 gave a weak teacher (reward 0.29; docs/results.md)
    sums_apart: bool = False

    @property
    def prompt_len(self) -> int:
        return self.digits + 2

    @property
    def response_len(self) -> int:
        return 2 * self.digits + 1

    def make_example(self, rng: random.Random) -> dict:
        ds = [rng.randrange(self.alphabet) for _ in range(self.digits)]
        answer, s = [], 0
        sum_base = FIRST_SYMBOL + (self.alphabet if self.sums_apart else 0)
        for d in ds:
            s = (s + d) % self.alphabet
            answer += [FIRST_SYMBOL + d, sum_base + s]
        return {"prompt": [BOS, *(FIRST_SYMBOL + d for d in ds), SEP], "answer": answer}
