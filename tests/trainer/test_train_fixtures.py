"""Shared set-up for the training-loop tests (no tests here): tiny teacher and student
model directories with one tokenizer, a prompt file with answers, and a TrainConfig."""

from __future__ import annotations

import json
import random
from pathlib import Path

from teacher_service.random_model import save_random_model
from trainer.config import (
    DataConfig,
    DenseConfig,
    OptimConfig,
    RewardSpec,
    RolloutConfig,
    RunConfig,
    SparseConfig,
    StudentConfig,
    TeacherSpec,
    TrainConfig,
)
from trainer.schedules import LambdaSchedule

VOCAB = 256


def tiny_models(root: Path) -> tuple[Path, Path]:
    """(teacher dir, student dir): random Llamas over the same V = 256 tokenizer."""
    teacher = root / "teacher"
    student = root / "student"
    if not (teacher / "config.json").exists():
        save_random_model(teacher, VOCAB, hidden=32, layers=2, heads=4, max_positions=64, seed=1)
        save_random_model(student, VOCAB, hidden=16, layers=1, heads=2, max_positions=64, seed=2,
                          init_std=0.1)  # fmt: skip
    return teacher, student


def tiny_prompts(path: Path, n: int, seed: int) -> Path:
    """n prompts <bos> x.. with answer = reversed x (any verifiable rule would do)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            xs = [rng.randrange(5, 40) for _ in range(rng.randrange(2, 5))]
            f.write(json.dumps({"prompt": [1, *xs, 4], "answer": xs[::-1]}) + "\n")
    return path


def tiny_config(root: Path, out_dir: Path, teachers: tuple[TeacherSpec, ...] | None = None,
                **dense: object) -> TrainConfig:  # fmt: skip
    """A few-second run: 2 prompts × G = 2 per step, 5 new tokens, in-process teacher."""
    teacher, student = tiny_models(root)
    prompts = root / "prompts.jsonl"
    if not prompts.exists():
        tiny_prompts(prompts, 64, seed=0)
    return TrainConfig(
        run=RunConfig(
            out_dir=str(out_dir), seed=5, steps=3, progress=False, plots=False, num_threads=1
        ),
        student=StudentConfig(model_dir=str(student)),
        data=DataConfig(prompts=str(prompts)),
        rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=5),
        teachers=teachers or (TeacherSpec(name="t", model_dir=str(teacher)),),
        dense=DenseConfig(**{"support": "union", "k": 8, "mode": "sparse", **dense}),
        sparse=SparseConfig(gamma=0.5, lam=LambdaSchedule("linear", 0.1, 1.0, 4)),
        rewards=(RewardSpec("token_accuracy", 0.5), RewardSpec("exact_match", 0.5)),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, decay="cosine"),
    )
