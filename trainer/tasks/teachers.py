"""Training a task's teacher (and the student's warm start) by supervision.

The teacher is a small Llama trained with cross-entropy on `task.teacher_answer` for
fresh random examples, with response input tokens replaced by random ids at a
per-sequence rate in [0, task.corrupt] (targets kept), plus one trailing <eos> target so
that it stops a student that ran past the answer (as trainer/demo/teacher_pretrain.py).

The student's warm start teaches the answer's format and which symbols it uses, not
their order: the correct answer's tokens shuffled, then <eos>. No teacher is involved, so
every method of the grid starts from the same student and the teacher tokens it would
have cost are zero. (A first version trained on random symbols instead; that student
ignored the prompt, and 150 hybrid steps barely moved it: docs/results.md.)
"""

from __future__ import annotations

import random

import torch
from transformers import LlamaForCausalLM

from trainer.demo.teacher_pretrain import ModelSize, new_model, supervised_train
from trainer.tasks.base import EOS, FIRST_SYMBOL, SyntheticTask

TEACHER_SIZE = ModelSize(hidden=128, layers=2, heads=4)
STUDENT_SIZE = ModelSize(hidden=64, layers=2, heads=8)


def teacher_batch(
    rng: random.Random, task: SyntheticTask, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, prompt_len + response_len + 1] for the teacher."""
    inputs, targets = [], []
    for _ in range(batch_size):
        ex = task.make_example(rng)
        seq = [*ex["prompt"], *task.teacher_answer(ex, rng), EOS, EOS]
        noisy = list(seq)
        rate = rng.uniform(0.0, task.corrupt)
        for i in range(task.prompt_len, len(seq) - 1):
            if rate and rng.random() < rate:
                if rng.random() < 0.5:
                    noisy[i] = FIRST_SYMBOL + rng.randrange(task.alphabet)
                else:
                    noisy[i] = rng.randrange(3, task.vocab_size)
        inputs.append(noisy)
        targets.append(seq)
    return torch.tensor(inputs), torch.tensor(targets)


def train_teacher(task: SyntheticTask, seed: int = 0, batch_size: int = 64) -> LlamaForCausalLM:
    """A freshly trained teacher for `task` (task.teacher_steps steps, lr 3e-3)."""
    lm = new_model(task, TEACHER_SIZE, seed)  # type: ignore[arg-type]  # duck-typed spec
    rng = random.Random(seed)
    supervised_train(lm, lambda: teacher_batch(rng, task, batch_size), task.prompt_len,
                     task.teacher_steps, 3e-3, f"teacher {task.name}")  # fmt: skip
    return lm.eval()


def warm_start(
    task: SyntheticTask,
    seed: int,
    steps: int = 30,
    batch_size: int = 64,
    size: ModelSize = STUDENT_SIZE,
) -> LlamaForCausalLM:
    """A fresh student of `size` after `steps` supervised steps on shuffled correct answers."""
    lm = new_model(task, size, seed)  # type: ignore[arg-type]
    if steps <= 0:
        return lm.eval()
    rng = random.Random(10_000 + seed)

    def batch() -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            ex = task.make_example(rng)
            rows.append([*ex["prompt"], *task.shuffled_answer(ex, rng), EOS])
        return torch.tensor(rows)

    supervised_train(lm, batch, task.prompt_len, steps, 3e-3, f"student format {task.name}")
    return lm.eval()
