"""The shared artefacts of a grid, built once and cached under <out>/shared/: each task's
teacher (with its measured reward), the student's warm start per (task, seed),
and the prompt files. Built under a lock, marked done atomically, so concurrent grid
processes build each one exactly once.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer.demo.evaluate import evaluate
from trainer.demo.teacher_pretrain import ModelSize, save_model
from trainer.experiment.files import locked, write_atomic, write_json
from trainer.rewards import resolve_reward
from trainer.tasks import REWARDS, SyntheticTask
from trainer.tasks.teachers import STUDENT_SIZE, train_teacher, warm_start

EVAL_SEED = 12345  # held-out prompts: a different stream from the training prompts


def eval_examples(task: SyntheticTask, n: int) -> list[dict]:
    rng = random.Random(EVAL_SEED)
    return [task.make_example(rng) for _ in range(n)]


def reward_fns() -> tuple[list, list[float]]:
    return [resolve_reward(n) for n, _ in REWARDS], [w for _, w in REWARDS]


def teacher_dir(shared: Path, task: SyntheticTask, eval_prompts: int) -> Path:
    """The task's teacher (trained on first use) with teacher_eval.json beside it."""
    out = shared / "teachers" / task.name
    if (out / "done.json").is_file():
        return out
    with locked(shared / "teachers" / f"{task.name}.lock"):
        if (out / "done.json").is_file():
            return out
        lm = train_teacher(task)
        save_model(lm, task, out)  # type: ignore[arg-type]  # duck-typed spec
        fns, ws = reward_fns()
        metrics = evaluate(lm, eval_examples(task, eval_prompts), fns, ws)
        write_json(out / "teacher_eval.json", metrics)
        write_json(out / "done.json", {"task": task.name, "teacher_steps": task.teacher_steps})
    return out


def teacher_eval(teacher: Path) -> dict[str, float]:
    return json.loads((teacher / "teacher_eval.json").read_text())


def student_init(
    shared: Path, task: SyntheticTask, seed: int, steps: int, size: ModelSize = STUDENT_SIZE
) -> Path:
    """The student's warm start (shuffled answers, tasks/teachers.py) for (task, seed).

    One grid directory holds one student per (task, seed): a cached one of another size or
    warm start is refused rather than reused (a grid whose `student` changed needs its own
    --out)."""
    out = shared / "students" / f"{task.name}-seed{seed}"
    want = {"task": task.name, "seed": seed, "steps": steps, "size": asdict(size)}
    if not (out / "done.json").is_file():
        with locked(shared / "students" / f"{task.name}-seed{seed}.lock"):
            if not (out / "done.json").is_file():
                lm = warm_start(task, seed, steps, size=size)
                save_model(lm, task, out)  # type: ignore[arg-type]
                write_json(out / "done.json", want)
    have = json.loads((out / "done.json").read_text())
    # Students cached before the size was recorded are STUDENT_SIZE, the only size then.
    have.setdefault("size", asdict(STUDENT_SIZE))
    if have != want:
        raise ValueError(f"{out} holds a student built as {have}, this grid wants {want}; "
                         "use another --out (or remove it to rebuild)")  # fmt: skip
    return out


def prompts_file(shared: Path, task: SyntheticTask, n: int) -> Path:
    """n training prompts (JSONL, the trainer's data.prompts format)."""
    out = shared / "prompts" / f"{task.name}-{n}.jsonl"
    if out.is_file():
        return out
    rng = random.Random(1)
    lines = [json.dumps(task.make_example(rng)) for _ in range(n)]
    write_atomic(out, "\n".join(lines) + "\n")
    return out


def load_lm(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
