"""One run of the grid: `python -m trainer.experiment.run_one GRID OUT TASK METHOD SEED`.

Builds (or reuses) the task's teacher, the student's warm start and the prompts, trains
with the project's loop (`trainer.train.train`; the in-process teacher of
trainer/teacher_source.py, not the gRPC service: the same top-K rows, without a server
process competing for the 2 cores) or with offline distillation (offline.py), evaluates
the result on held-out prompts, and writes <run dir>/result.json atomically: the marker
that the run is done (a killed run leaves none and is redone). The grid runner calls
`execute`; `main` runs one run on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainer.config import RewardSpec, TeacherSpec, TrainConfig, load_config
from trainer.demo.evaluate import evaluate
from trainer.demo.teacher_pretrain import save_model
from trainer.experiment.files import RESULT, write_json
from trainer.experiment.grid import Grid, Run, load_grid, offline_overrides
from trainer.experiment.models import (
    eval_examples,
    load_lm,
    prompts_file,
    reward_fns,
    student_init,
    teacher_dir,
    teacher_eval,
)
from trainer.experiment.offline import OfflineConfig, train_offline
from trainer.tasks import REWARDS, get_task
from trainer.train import train

HISTORY_KEYS = ("reward", "kl_sampled", "kl", "student_mass", "response_len", "lam", "loss")


def _git_state() -> str:
    """HEAD's commit, "+dirty" when the trainer's sources differ from it."""
    root = Path(__file__).resolve().parents[2]
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"]
        head = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
        head = head.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "trainer"], cwd=root)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.returncode else "")


def _samples_per_step(config: TrainConfig) -> int:
    """Sequences one optimizer step trains on (the on-policy phase's, for two phases)."""
    ro = config.rollout
    return ro.prompts_per_step * ro.group_size * config.optim.accum_steps


def _history_row(i: int, row: dict[str, float]) -> dict[str, float]:
    keep = {k: row[k] for k in HISTORY_KEYS if k in row}
    return {"step": i + 1, "teacher_tokens": row.get("teacher_tokens", 0.0), **keep}


def execute(grid: Grid, out: Path, run: Run, threads: int = 1) -> dict[str, Any]:
    """Trains and evaluates `run`; returns (and writes) its result record."""
    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    task = get_task(run.task)
    if grid.teacher_steps is not None:
        task = dataclasses.replace(task, teacher_steps=grid.teacher_steps)
    shared = out / "shared"
    tdir = teacher_dir(shared, task, grid.eval_prompts)
    sdir = student_init(shared, task, run.seed, grid.warm_steps, grid.student)
    prompts = prompts_file(shared, task, grid.train_prompts)
    rdir = run.directory(out)
    common = {
        "student.model_dir": str(sdir),
        "data.prompts": str(prompts),
        "run.out_dir": str(rdir / "train"),
        "run.seed": run.seed,
        "run.steps": grid.steps,
        "run.resume": False,
        "run.progress": False,
        "run.plots": False,
        "run.num_threads": threads,
        "rollout.max_new_tokens": task.response_len + 2,
    }

    def build(overrides: dict[str, Any]) -> TrainConfig:
        config = load_config(grid.base, {**common, **overrides})
        return dataclasses.replace(
            config,
            teachers=(TeacherSpec(name=task.name, model_dir=str(tdir)),),
            rewards=tuple(RewardSpec(fn, w) for fn, w in REWARDS),
        )

    n_off = run.method.offline_steps
    if run.method.kind == "offline":
        config = build(offline_overrides(run.method))
        off = train_offline(config, OfflineConfig())
        history, student = off.history, off.student
    else:
        config = build(dict(run.method.overrides))
        history = []
        if n_off:  # offline distillation first; the on-policy loop starts from its student
            off_cfg = build(offline_overrides(run.method))
            off_run = dataclasses.replace(off_cfg.run, steps=n_off, out_dir=str(rdir / "offline"))
            off = train_offline(dataclasses.replace(off_cfg, run=off_run), OfflineConfig())
            history = off.history
            warm = save_model(off.student, task, rdir / "offline_student")  # type: ignore[arg-type]
            config = dataclasses.replace(
                config,
                student=dataclasses.replace(config.student, model_dir=str(warm)),
                run=dataclasses.replace(config.run, steps=grid.steps - n_off),
            )
        result = train(config)
        student = result.student
        B = _samples_per_step(config)
        for row in result.history:  # teacher tokens the step needed: its response tokens scored
            row["teacher_tokens"] = 0.0 if config.dense.kl_coef == 0 else row["response_len"] * B
        history = history + result.history
    fns, ws = reward_fns()
    teacher = load_lm(tdir)
    final = evaluate(student, eval_examples(task, grid.eval_prompts), fns, ws, teacher=teacher)
    record = {
        "task": run.task,
        "method": run.method.name,
        "kind": run.method.kind,
        "seed": run.seed,
        "overrides": dict(run.method.overrides),
        "offline_steps": n_off,
        "offline_overrides": dict(run.method.offline_overrides),
        "steps": grid.steps,
        "samples_per_step": _samples_per_step(config),
        "student": dataclasses.asdict(grid.student),
        "warm_steps": grid.warm_steps,
        "grid": str(grid.path),
        "teacher": teacher_eval(tdir),
        "final": final,
        "history": [_history_row(i, row) for i, row in enumerate(history)],
        "wall_s": time.perf_counter() - t0,
        "git": _git_state(),
        "config": json.loads((rdir / "train" / "config.json").read_text())
        if (rdir / "train" / "config.json").is_file()
        else None,
    }
    write_json(rdir / RESULT, record)
    return record


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (5, 6):
        print("usage: python -m trainer.experiment.run_one GRID OUT TASK METHOD SEED [THREADS]",
              file=sys.stderr)  # fmt: skip
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    grid_path, out, task, method, seed = args[:5]
    threads = int(args[5]) if len(args) == 6 else 1
    grid = load_grid(grid_path)
    run = Run(task, grid.method(method), int(seed))
    execute(grid, Path(out), run, threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
