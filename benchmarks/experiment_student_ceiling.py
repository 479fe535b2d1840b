"""What a task's student learns from the true answers: a supervised reference for the grid.

    python -m benchmarks.experiment_student_ceiling --task trace --heads 8 2 \\
        [--seeds 0 1 2] [--steps 2000] [--every 250] [--groups 2] [--json out.json]
    python -m benchmarks.experiment_student_ceiling --task trace_apart \\
        --warm-start runs/experiments/long/shared     # from the grid's warm starts

No teacher and no sampling: each step is cross-entropy on the correct answers of fresh
examples, as many sequences as an on-policy step samples (8 prompts × G = 4 = 32), with
the grid's optimiser (AdamW, lr 3e-3, betas 0.9/0.95, clip 1). It is a reference, not a
bound: a method that learns from a teacher sees soft targets and its own prefixes, and one
`trace` run did learn what this did not (docs/results.md § "Why trace is slow"). The
student is the grid's (hidden 64, 2 layers) with each number of attention heads asked
for, so the parameter count is the same and only the head dimension (64 / heads)
differs; or, with --warm-start, the grid's warm-started student of each seed. Every
`every` steps: the reward of sampled answers (T = 1) on held-out prompts, and the
per-position accuracy of benchmarks/experiment_position_accuracy.py split into `groups`
(trace: digits read, running sums).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import random
from pathlib import Path

import torch

from benchmarks.experiment_position_accuracy import (
    group_cells,
    group_columns,
    position_accuracy,
    summarise,
)
from trainer.demo.evaluate import evaluate
from trainer.demo.teacher_pretrain import ModelSize, new_model
from trainer.experiment.models import eval_examples, load_lm, reward_fns
from trainer.tasks import get_task
from trainer.tasks.base import EOS


def curve(
    task_name: str,
    heads: int,
    seed: int,
    steps: int,
    every: int,
    groups: int,
    weight_decay: float = 0.0,
    sums_apart: bool = False,
    init: Path | None = None,
) -> list:
    """The student's reward and per-position accuracy every `every` steps; a fresh student
    of `heads` heads, or the one saved at `init` (the grid's warm start)."""
    task = get_task(task_name)
    if sums_apart:  # trace only (checked in main): the sums get their own symbols
        task = dataclasses.replace(task, sums_apart=True)
    if init is not None:
        lm = load_lm(init)
    else:
        lm = new_model(task, ModelSize(hidden=64, layers=2, heads=heads), seed)  # type: ignore[arg-type]
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=weight_decay)
    rng, held_out = random.Random(1000 + seed), eval_examples(task, 128)
    fns, ws = reward_fns()
    points = []
    for step in range(1, steps + 1):
        rows = [task.make_example(rng) for _ in range(32)]
        batch = torch.tensor([[*e["prompt"], *e["answer"], EOS] for e in rows])
        lm.train()
        logits = lm(batch).logits[:, task.prompt_len - 1 : -1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, task.prompt_len :].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        if step % every == 0 or step == steps:
            metrics = evaluate(lm, held_out, fns, ws, seed=seed)
            acc = position_accuracy(lm, task, held_out)
            points.append({"step": step, "loss": loss.item(), "reward": metrics["reward"],
                           "groups": summarise(acc, groups)})  # fmt: skip
            print(f"heads {heads} wd {weight_decay:g} seed {seed} step {step}: "
                  f"reward {metrics['reward']:.3f} "
                  + " ".join(f"g{i} {g['mean']:.2f}/{g['min']:.2f}"
                             for i, g in enumerate(points[-1]["groups"])), flush=True)  # fmt: skip
    return points


def markdown(results: list[dict], groups: int) -> str:
    head, rule = group_columns(groups, unlearned=False)
    lines = ["| heads | weight decay | seed | step | reward (T = 1) |" + head,
             "|---|---|---|---|---|" + rule]  # fmt: skip
    for r in results:
        for p in r["points"]:
            cells = group_cells(p["groups"], unlearned=False)
            lines.append(f"| {r['heads']} | {r['weight_decay']:g} | {r['seed']} | {p['step']} "
                         f"| {p['reward']:.3f} |{cells}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", required=True)
    ap.add_argument("--heads", type=int, nargs="+", default=[8])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--weight-decay", type=float, nargs="+", default=[0.0],
                    help="AdamW's decoupled weight decay (grid: 0); a curve per value")  # fmt: skip
    ap.add_argument("--sums-apart", action="store_true",
                    help="trace: write the running sums with their own symbols")  # fmt: skip
    ap.add_argument("--warm-start", type=Path, metavar="SHARED",
                    help="start from the grid's warm start SHARED/students/<task>-seed<k> "
                         "(its size; --heads is ignored) instead of a fresh student")  # fmt: skip
    ap.add_argument("--groups", type=int, default=1, help="split positions by index mod this")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    for h in args.heads:
        if h < 1 or 64 % h:
            ap.error(f"--heads must divide the hidden size 64, got {h}")
    if args.steps < 1 or args.every < 1 or args.groups < 1:
        ap.error("--steps, --every and --groups must be ≥ 1")
    if any(wd < 0 for wd in args.weight_decay):
        ap.error(f"--weight-decay must be ≥ 0, got {args.weight_decay}")
    task = get_task(args.task)  # an unknown task fails here, naming the known ones
    if args.sums_apart and not hasattr(task, "sums_apart"):
        ap.error(f"--sums-apart is a trace option; task {args.task!r} has no running sums")

    def init(seed: int) -> Path | None:
        return (
            None
            if args.warm_start is None
            else args.warm_start / "students" / f"{args.task}-seed{seed}"
        )

    for seed in args.seeds if args.warm_start is not None else ():
        if not (init(seed) / "done.json").is_file():  # type: ignore[operator]
            ap.error(f"no warm start for {args.task} seed {seed} under {args.warm_start}/students")
    torch.set_num_threads(1)
    results = [{"heads": h, "weight_decay": wd, "seed": s,
                "sums_apart": args.sums_apart, "warm_start": args.warm_start is not None,
                "points": curve(args.task, h, s, args.steps, args.every, args.groups, wd,
                                args.sums_apart, init(s))}
               for h in args.heads for wd in args.weight_decay for s in args.seeds]  # fmt: skip
    variant = (" (sums apart)" if args.sums_apart else "") + (
        f" from the warm starts in {args.warm_start}" if args.warm_start else ""
    )
    print(f"\n{args.task}{variant}, supervised on true answers, {platform.node()}, "
          f"{datetime.date.today()}\n")  # fmt: skip
    print(markdown(results, args.groups))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
