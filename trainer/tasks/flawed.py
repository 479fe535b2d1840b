"""Reversal with a teacher that is right only part of the time: reward ≠ teacher on purpose.

The prompts and the reward are the reversal task's. On prompts whose first symbol lies in
the lower half of the alphabet the teacher was trained on the prompt *copied in order*
70 % of the time and on the correct reversal 30 % of the time, so it learned that mixture:
it opens with the wrong symbol with probability ≈ 0.7 and then continues whichever answer
it started. On the other half it is right. Its reward at temperature 1 is therefore well
below 1 (≈ 0.7), pure distillation can at best copy it, and the reward has to move the
student to the teacher's minority answer on those prompts (a KL cost of about
−log 0.3 ≈ 1.2 nats at the first token, after which the teacher agrees again).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainer.tasks.base import FIRST_SYMBOL
from trainer.tasks.reversal import ReversalTask


@dataclass(frozen=True)
class FlawedTeacherTask(ReversalTask):
    name: str = "flawed"
    wrong_rate: float = 0.7  # teacher's training targets on the lower-half prompts

    def teacher_unreliable_on(self, example: dict) -> bool:
        """The lower half of the alphabet as first symbol: the teacher mostly copies."""
        return example["prompt"][1] - FIRST_SYMBOL < self.alphabet // 2

    def teacher_answer(self, example: dict, rng: random.Random) -> list[int]:
        if self.teacher_unreliable_on(example) and rng.random() < self.wrong_rate:
            return list(example["prompt"][1:-1])
        return list(example["answer"])
