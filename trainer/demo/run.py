"""`hybrid-distill demo [--quick] [--out DIR]`: the end-to-end demo on a CPU-only machine.

1. builds the synthetic task (task.py: reverse a symbol sequence; vocabulary 1,024, so a
   top-K with K ≤ 64 truly truncates) and writes its prompts;
2. trains the teacher with supervised cross-entropy, cached after the first run
   (teacher_pretrain.py; cache in --cache, default ~/.cache/hybrid-distill/demo);
3. starts the teacher service on loopback, in a subprocess: serving and training are
   both CPU-bound torch work, and a separate process keeps them from contending for one
   Python GIL (the gRPC server's event loop would otherwise stall behind the training
   loop's Python), exactly as in production where the teacher runs elsewhere;
4. builds the smaller student (hidden 64 vs 128): fresh weights plus a minimal warm start
   of 50 supervised steps on the teacher's greedy answers, which only teaches the answer's
   format (symbols, then <eos>): its greedy accuracy stays at 0 and its reward at chance.
   Then the hybrid phase does the learning: it trains the student against the service
   with the hybrid objective (configs/demo.yaml: Dense top-K on the union of student and
   teacher top-K, `renorm` mode, + Sparse with the task reward). The teacher is trained on
   corrupted response prefixes (teacher_pretrain.py), so that its advice is right on the
   student's wrong prefixes; docs/results.md has the numbers and what did not work;
5. prints a results table (teacher accuracy, student before/after, KL to the teacher),
   and writes results.json, results.md and the plots (reward.png, kl.png) under --out.

`--quick` is the few-minute variant CI runs; `--in-process` skips the service (teacher
in the trainer's process), for debugging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from trainer.config import TeacherSpec, load_config
from trainer.demo.evaluate import evaluate
from trainer.demo.task import TaskSpec, make_example, write_prompts
from trainer.demo.teacher_pretrain import (
    ModelSize,
    TeacherRecipe,
    new_model,
    pretrain_teacher,
    save_model,
    supervised_train,
)
from trainer.rewards import resolve_reward
from trainer.rollout import sample
from trainer.train import train

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class Preset:
    """The sizes of one demo variant."""

    config: str  # file in configs/
    teacher: TeacherRecipe
    student: ModelSize
    warm_steps: int  # supervised warm start of the student on teacher answers (format only)
    train_prompts: int
    eval_prompts: int


FULL = Preset(
    config="demo.yaml",
    teacher=TeacherRecipe(),
    # 8 heads, not 4 (same parameter count): with 4 the on-policy student learned every
    # answer position but a middle one and stalled at 44 % of the teacher's reward.
    student=ModelSize(hidden=64, layers=2, heads=8),
    warm_steps=50,
    train_prompts=40000,
    eval_prompts=512,
)
QUICK = Preset(
    config="demo_quick.yaml",
    teacher=TeacherRecipe(),  # the same recipe: one cached teacher serves both variants
    student=ModelSize(hidden=64, layers=2, heads=8),
    warm_steps=50,
    train_prompts=4000,
    eval_prompts=256,
)


def warm_start(
    lm: torch.nn.Module, teacher: torch.nn.Module, spec: TaskSpec, steps: int, seed: int
) -> None:
    """Supervised steps on the teacher's greedy responses to fresh prompts (none if 0)."""
    if steps <= 0:
        return
    rng = random.Random(seed)

    def batch() -> torch.Tensor:
        examples = [make_example(rng, spec) for _ in range(64)]
        ro = sample(teacher, [e["prompt"] for e in examples], examples, group_size=1,
                    temperature=0.0, max_new_tokens=spec.response_len, stop_ids=(2,),
                    keep_topk=1, pad_id=0)  # fmt: skip
        R = spec.response_len
        return torch.tensor(
            [p + (r + [0] * R)[:R] for p, r in zip(ro.prompt_ids, ro.response_ids, strict=True)]
        )

    supervised_train(lm, batch, spec.prompt_len, steps, 3e-3, "student warm start")


class TeacherProcess:
    """`python -m teacher_service` on 127.0.0.1 with free ports, as a subprocess."""

    def __init__(self, model_dir: Path, log_path: Path, threads: int) -> None:
        cmd = [sys.executable, "-m", "teacher_service", "--model", f"demo={model_dir}",
               "--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0",
               "--torch-threads", str(threads), "--grace-seconds", "1"]  # fmt: skip
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=self._log, text=True)
        self.grpc_port = self._wait_for_ports()

    def _wait_for_ports(self, timeout_s: float = 120.0) -> int:
        deadline = time.monotonic() + timeout_s
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # the server logs one parseable line when ready
            self._log.write(line)
            match = re.search(r"serving grpc_port=(\d+) http_port=(\d+)", line)
            if match:
                self._log.flush()
                # Keep draining stderr so the server never blocks on a full pipe.
                self._pump = threading.Thread(target=self._drain, daemon=True)
                self._pump.start()
                return int(match.group(1))
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("the teacher service did not start; see its log")

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._log.write(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        pump = getattr(self, "_pump", None)
        if pump is not None:
            pump.join(timeout=10)
        self._log.close()


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    lines = [f"| {'':<{w}} | value |", f"|{'-' * (w + 2)}|-------|"]
    return "\n".join(lines + [f"| {k:<{w}} | {v} |" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    """Runs the demo; returns 0 (the results are printed and written under --out)."""
    parser = argparse.ArgumentParser(prog="hybrid-distill demo", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the few-minute CI variant")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="results, run, models")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/hybrid-distill/demo",
                        help="where the pre-trained teacher is cached")  # fmt: skip
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: cores − 1)")
    parser.add_argument("--in-process", action="store_true", help="no service: local teacher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    t0 = time.perf_counter()
    preset = QUICK if args.quick else FULL
    # The service subprocess gets one core; the trainer the rest (at least one).
    threads = args.threads or max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    # 1. Task and prompts.
    spec = TaskSpec()
    prompts = write_prompts(out / "prompts.jsonl", preset.train_prompts, seed=1, spec=spec)
    rng = random.Random(12345)  # held-out prompts (a different seed from training)
    eval_set = [make_example(rng, spec) for _ in range(preset.eval_prompts)]

    # 2. Teacher (cached).
    teacher_dir = pretrain_teacher(args.cache, spec, preset.teacher)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()

    # 3. Student: fresh weights + warm start.
    student = new_model(spec, preset.student, seed=1)
    config = load_config(CONFIGS / preset.config)
    reward_fns = [resolve_reward(r.fn) for r in config.rewards]
    reward_w = [r.weight for r in config.rewards]
    at_init = evaluate(student, eval_set, reward_fns, reward_w, teacher=teacher)
    warm_start(student, teacher, spec, preset.warm_steps, seed=2)
    student_dir = save_model(student.eval(), spec, out / "student-init")

    config = load_config(
        CONFIGS / preset.config,
        {"student.model_dir": str(student_dir), "data.prompts": str(prompts),
         "run.out_dir": str(out / "run"), "run.resume": False, "run.num_threads": threads},
    )  # fmt: skip
    before = evaluate(student, eval_set, reward_fns, reward_w, teacher=teacher)
    teacher_eval = evaluate(teacher, eval_set, reward_fns, reward_w)

    # 4. Teacher service on loopback, then the hybrid training against it.
    service = None
    if args.in_process:
        teachers = (TeacherSpec(name="demo", model_dir=str(teacher_dir)),)
    else:
        service = TeacherProcess(teacher_dir, out / "teacher_service.log", threads=1)
        teachers = (TeacherSpec(name="demo", endpoints=(f"127.0.0.1:{service.grpc_port}",)),)
    config = dataclasses.replace(config, teachers=teachers)
    try:
        result = train(config)
    finally:
        if service is not None:
            service.stop()

    # 5. Results.
    after = evaluate(result.student, eval_set, reward_fns, reward_w, teacher=teacher)
    seconds = time.perf_counter() - t0
    results = {
        "variant": "quick" if args.quick else "full",
        "teacher": teacher_eval,
        "student_init": at_init,
        "warm_steps": preset.warm_steps,
        "student_before": before,
        "student_after": after,
        "reward_ratio": after["reward"] / max(teacher_eval["reward"], 1e-9),
        "train_steps": result.steps,
        "seconds": seconds,
        "teacher_source": "in-process" if args.in_process else "service (subprocess, loopback)",
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = _table(
        [
            ("teacher accuracy (exact, greedy)", f"{teacher_eval['accuracy']:.3f}"),
            ("student accuracy at random init", f"{at_init['accuracy']:.3f}"),
            (
                f"student accuracy after warm start ({preset.warm_steps} steps)",
                f"{before['accuracy']:.3f}",
            ),
            ("student accuracy after hybrid", f"{after['accuracy']:.3f}"),
            ("teacher reward (T=1 samples)", f"{teacher_eval['reward']:.3f}"),
            ("student reward at random init", f"{at_init['reward']:.3f}"),
            ("student reward after warm start", f"{before['reward']:.3f}"),
            ("student reward after hybrid", f"{after['reward']:.3f}"),
            ("student/teacher reward", f"{results['reward_ratio']:.2f}"),
            ("KL(student ‖ teacher) at random init", f"{at_init['kl']:.3f}"),
            ("KL(student ‖ teacher) after warm start", f"{before['kl']:.3f}"),
            ("KL(student ‖ teacher) after hybrid", f"{after['kl']:.3f}"),
            ("wall time (s)", f"{seconds:.0f}"),
        ]
    )
    (out / "results.md").write_text(table + "\n")
    print(f"\n{table}\n\nresults: {out / 'results.json'}; plots: {out / 'run'}/{{reward,kl}}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
