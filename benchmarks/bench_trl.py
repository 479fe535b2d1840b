"""The TRL trainer against the built-in loop: time per optimizer step, and the share of
it spent waiting for the teacher, on the same workload, one run each, side by side.

    python benchmarks/bench_trl.py                       # demo-task workload, 8 steps each
    python benchmarks/bench_trl.py --steps 12 --json out.json

Workload: the demo task (trainer/demo/task.py, V = 1,024), random Llamas for the student
(hidden 64, 2 layers) and the teacher (hidden 128, 2 layers), 8 prompts × G = 4 rollouts
of up to 8 tokens per step, Dense support "union" with K = 32 in "renorm" mode, rewards
token_accuracy + exact_match, one process, `--threads` torch threads in the trainer. The
teacher is a real `teacher_service.server` process on 127.0.0.1 with one thread, shared
by both runs (the built-in loop first, then TRL). The first `--warmup` steps of each run
are dropped; the table gives medians over the rest.

Step time: the built-in loop's `step_time_s` (rollouts to optimizer step); TRL's is the
wall time between consecutive `on_step_end` callbacks (generation, rewards, teacher,
loss, optimizer and TRL's bookkeeping). Teacher wait: time blocked on the teachers'
results within the step (`Pending.result()` in both; the loop after its forward, TRL
after its reward functions).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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
from trainer.demo.task import TaskSpec, write_prompts
from trainer.schedules import LambdaSchedule

PROMPTS, G, MAX_NEW, K = 8, 4, 8, 32


def start_teacher(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """A teacher server process with one torch thread; returns it and its address."""
    cmd = [sys.executable, "-m", "teacher_service.server", "--model", f"t={model}",
           "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
           "--grace-seconds", "0", "--torch-threads", "1"]  # fmt: skip
    with log.open("wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600  # a loaded CI machine starts a server slowly
    while time.monotonic() < deadline:
        match = re.search(r"serving grpc_port=(\d+)", log.read_text(errors="replace"))
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"teacher did not start:\n{log.read_text()[-2000:]}")


def loop_config(root: Path, student: Path, prompts: Path, address: str, steps: int) -> TrainConfig:
    return TrainConfig(
        run=RunConfig(
            out_dir=str(root / "loop"),
            seed=0,
            steps=steps,
            progress=False,
            plots=False,
            resume=False,
        ),
        student=StudentConfig(model_dir=str(student)),
        data=DataConfig(prompts=str(prompts)),
        rollout=RolloutConfig(prompts_per_step=PROMPTS, group_size=G, max_new_tokens=MAX_NEW),
        teachers=(TeacherSpec(name="t", endpoints=(address,)),),
        dense=DenseConfig(support="union", k=K, mode="renorm"),
        sparse=SparseConfig(gamma=0.0, lam=LambdaSchedule("constant", 1.0)),
        rewards=(RewardSpec("token_accuracy", 0.5), RewardSpec("exact_match", 0.5)),
        optim=OptimConfig(lr=3e-3),
    )


def run_loop(config: TrainConfig) -> list[dict[str, float]]:
    from trainer.train import train

    return [
        {"step_s": h["step_time_s"], "wait_s": h["teacher_wait_frac"] * h["step_time_s"]}
        for h in train(config).history
    ]


def run_trl(config: TrainConfig, root: Path, spec: TaskSpec) -> list[dict[str, float]]:
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from trl_hybrid_distill import demo_dataset  # the example's dataset builder

    from trainer.integrations.trl_rewards import trl_reward
    from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not ends:
                ends.append(time.perf_counter())  # the first step starts here

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(config.student.model_dir)
    args = GRPOConfig(
        output_dir=str(root / "trl"), use_cpu=True, bf16=False, gradient_checkpointing=False,
        report_to=[], logging_steps=1, save_strategy="no", beta=0.0, disable_tqdm=True,
        per_device_train_batch_size=PROMPTS * G, num_generations=G,
        max_completion_length=MAX_NEW, max_steps=config.run.steps,
        learning_rate=config.optim.lr, lr_scheduler_type="constant", max_grad_norm=1.0,
        reward_weights=[r.weight for r in config.rewards], seed=0,
    )  # fmt: skip
    trainer = HybridGRPOTrainer(
        model=config.student.model_dir,
        reward_funcs=[trl_reward(r.fn) for r in config.rewards],
        args=args,
        train_dataset=demo_dataset(tok, spec, 2000, seed=1),
        processing_class=tok,
        callbacks=[StepClock()],
        hybrid=HybridConfig(teachers=config.teachers, dense=config.dense, sparse=config.sparse),
    )
    trainer.train()
    steps = [b - a for a, b in itertools.pairwise(ends)]
    return [
        {"step_s": s, "wait_s": r["teacher_wait_s"]}
        for s, r in zip(steps, trainer.step_records, strict=True)
    ]


def summary(rows: list[dict[str, float]], warmup: int) -> dict[str, float]:
    kept = rows[warmup:]
    return {
        "steps": len(kept),
        "step_s": statistics.median(r["step_s"] for r in kept),
        "wait_share": statistics.median(r["wait_s"] / r["step_s"] for r in kept),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the trainer")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(args.threads)
    spec = TaskSpec()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = save_random_model(root / "teacher", spec.vocab_size, hidden=128, layers=2,
                                    heads=4, max_positions=64, seed=1)  # fmt: skip
        student = save_random_model(root / "student", spec.vocab_size, hidden=64, layers=2,
                                    heads=4, max_positions=64, seed=2)  # fmt: skip
        prompts = write_prompts(root / "prompts.jsonl", 2000, seed=1, spec=spec)
        proc, address = start_teacher(teacher, root / "teacher.log")
        try:
            config = loop_config(root, student, prompts, address, args.steps)
            loop = summary(run_loop(config), args.warmup)
            trl = summary(run_trl(dataclasses.replace(config), root, spec), args.warmup)
        finally:
            proc.kill()
            proc.wait()
    ratio = trl["step_s"] / loop["step_s"]
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, trainer threads "
          f"{args.threads}")  # fmt: skip
    print("| trainer | steps | median step time (s) | teacher wait share |")
    print("|---|---|---|---|")
    for name, s in (("built-in loop", loop), ("TRL HybridGRPOTrainer", trl)):
        print(f"| {name} | {s['steps']} | {s['step_s']:.3f} | {s['wait_share']:.1%} |")
    print(f"\nTRL / built-in step time: {ratio:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"loop": loop, "trl": trl, "ratio": ratio}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
