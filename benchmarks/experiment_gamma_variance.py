"""Why the γ = 1 Sparse term diverged, measured: the variance of its gradient per baseline.

    python -m benchmarks.experiment_gamma_variance --shared runs/experiments/grid/shared \\
        [--task reversal] [--reps 12] [--json out.json]

Uses the experiment grid's artefacts (the task's teacher and the seed-0 student warm
start, built by `hybrid-distill experiment run`). For one fixed set of prompts it draws
`reps` independent rollout batches (8 prompts × G = 4) from the student and computes, for
each, the gradient of the Sparse term alone (the Dense term has no sampling variance of
its own beyond the states) with respect to every student parameter, under each
(γ, baseline) variant on the *same* samples. Reported per variant: the total variance of
that gradient across batches, E‖g − ḡ‖², its mean's norm ‖ḡ‖, and whether the variant is
unbiased (test_theorem1.py proves which are). λ = 2, as in the grid.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
from pathlib import Path

import torch

from trainer.experiment.models import load_lm, reward_fns
from trainer.objective import UNBIASED_BASELINES, hybrid_loss
from trainer.rewards import score_rewards
from trainer.rollout import ResponseLogits, sample
from trainer.tasks import get_task

VARIANTS = (  # (label, gamma, baseline, cost_clip)
    ("γ=0, loo (reward)", 0.0, "loo", None),
    ("γ=1, none", 1.0, "none", None),
    ("γ=1, loo (reward only)", 1.0, "loo", None),
    ("γ=1, loo_position", 1.0, "loo_position", None),
    ("γ=1, std_position", 1.0, "std_position", None),
    ("γ=1, loo_position + clip 2", 1.0, "loo_position", 2.0),
)


def measure(shared: Path, task_name: str, reps: int, lam: float = 2.0) -> list[dict]:
    torch.manual_seed(0)
    task = get_task(task_name)
    student = load_lm(shared / "students" / f"{task_name}-seed0")
    teacher = load_lm(shared / "teachers" / task_name)
    fns, ws = reward_fns()
    weights = torch.tensor(ws).unsqueeze(-1)
    rng = random.Random(7)
    examples = [task.make_example(rng) for _ in range(8)]
    params = [p for p in student.parameters() if p.requires_grad]
    grads: dict[str, list[torch.Tensor]] = {v[0]: [] for v in VARIANTS}
    gen = torch.Generator()
    stats = {"response_len": 0.0, "cost_mean": 0.0, "future_cost_abs": 0.0}
    for rep in range(reps):
        gen.manual_seed(1000 + rep)
        ro = sample(student, [e["prompt"] for e in examples], examples, group_size=4,
                    temperature=1.0, max_new_tokens=task.response_len + 2, stop_ids=(2,),
                    keep_topk=1, pad_id=0, generator=gen)  # fmt: skip
        b = ro.layout(0)
        r = (weights * score_rewards(fns, ro.prompt_ids, ro.response_ids, ro.metas)).sum(0)
        with torch.no_grad():
            lq = torch.log_softmax(ResponseLogits(teacher)(b.input_ids, b.positions), -1)
            lq_tok = lq.gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)
        logits = ResponseLogits(student)(b.input_ids, b.positions)
        lp = torch.log_softmax(logits, -1).gather(-1, b.targets.unsqueeze(-1)).squeeze(-1)
        zero = torch.zeros_like(lp)
        with torch.no_grad():
            c = (lp - lq_tok) * b.mask
            stats["response_len"] += float(b.mask.sum(-1).mean()) / reps
            stats["cost_mean"] += float(c.sum() / b.mask.sum()) / reps
            stats["future_cost_abs"] += float((c.sum(-1)).abs().mean()) / reps
        for label, gamma, kind, clip in VARIANTS:
            loss, _ = hybrid_loss(lp, zero, lq_tok, b.mask, r, gamma=gamma, lam=lam,
                                  group_size=4, baseline_kind=kind, cost_clip=clip)  # fmt: skip
            g = torch.autograd.grad(loss, params, retain_graph=True)
            grads[label].append(torch.cat([x.reshape(-1) for x in g]))
    rows = []
    for label, gamma, kind, clip in VARIANTS:
        g = torch.stack(grads[label])  # [reps, P]
        mean = g.mean(0)
        rows.append({
            "variant": label, "gamma": gamma, "baseline": kind, "cost_clip": clip,
            "unbiased": kind in UNBIASED_BASELINES and clip is None,
            "variance": float(((g - mean) ** 2).sum(-1).mean()),
            "mean_norm": float(mean.norm()),
        })  # fmt: skip
    for row in rows:
        row |= {k: v for k, v in stats.items()}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=Path("runs/experiments/grid/shared"))
    ap.add_argument("--task", default="reversal")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.shared, args.task, args.reps)
    base = rows[0]["variance"]
    print(f"task {args.task}, {args.reps} batches of 8 prompts × G = 4, λ = 2, "
          f"{platform.processor() or platform.machine()}, {datetime.date.today()}")  # fmt: skip
    print(
        f"mean response length {rows[0]['response_len']:.2f}, mean cost per token "
        f"{rows[0]['cost_mean']:.2f} nats, mean |Σ_t c_t| {rows[0]['future_cost_abs']:.1f}\n"
    )
    print("| variant | unbiased | Var of Sparse grad | × γ=0 | ‖mean grad‖ |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {'yes' if r['unbiased'] else 'no'} | {r['variance']:.3g} "
              f"| {r['variance'] / base:.3g} | {r['mean_norm']:.3g} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
