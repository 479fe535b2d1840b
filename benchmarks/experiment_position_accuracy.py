"""Where a grid's students fail: teacher-forced accuracy per answer position.

    python -m benchmarks.experiment_position_accuracy --out runs/experiments/long \\
        --task trace [--groups 2] [--prompts 256] [--json out.json]

For the task's teacher and every run of the task under <out>/runs that kept its final
student (<run>/train/checkpoint/model), feeds held-out prompts with their *correct*
answers and takes the argmax at each answer position. A sampled answer earns exact match
only when every position is right, so one position the student has not learned caps its
reward however well it does elsewhere; this table shows which.

`--groups g` splits the answer positions by index mod g (trace: g = 2 separates the digits
read, copied from the prompt, from the running sums, computed). Per group: the mean
accuracy, the worst position's, and how many positions are below 0.5 (not learned).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

from trainer.experiment.models import eval_examples, load_lm
from trainer.tasks import get_task
from trainer.tasks.base import EOS, SyntheticTask


def position_accuracy(
    lm: torch.nn.Module, task: SyntheticTask, examples: list[dict]
) -> torch.Tensor:
    """[answer_len] accuracy of the argmax next token given the correct prefix."""
    batch = torch.tensor([[*e["prompt"], *e["answer"], EOS] for e in examples])
    with torch.no_grad():
        logits = lm(batch).logits[:, task.prompt_len - 1 : -2]  # answer positions, no <eos>
    targets = batch[:, task.prompt_len : -1]
    return (logits.argmax(-1) == targets).float().mean(0)


def summarise(acc: torch.Tensor, groups: int) -> list[dict]:
    rows = []
    for g in range(groups):
        part = acc[g::groups]
        rows.append({"mean": part.mean().item(), "min": part.min().item(),
                     "unlearned": int((part < 0.5).sum())})  # fmt: skip
    return rows


def measure(out: Path, task_name: str, groups: int, prompts: int) -> list[dict]:
    task = get_task(task_name)
    examples = eval_examples(task, prompts)
    models = {"teacher": out / "shared" / "teachers" / task_name}
    for model in sorted((out / "runs" / task_name).glob("*/seed*/train/checkpoint/model")):
        run = model.parents[2]
        models[f"{run.parent.name}/{run.name}"] = model
    results = []
    for name, path in models.items():
        acc = position_accuracy(load_lm(path), task, examples)
        final = path.parents[2] / "result.json"
        reward = json.loads(final.read_text())["final"]["reward"] if final.is_file() else None
        results.append({"model": name, "reward": reward, "groups": summarise(acc, groups),
                        "per_position": [round(a, 3) for a in acc.tolist()]})  # fmt: skip
    return results


def group_columns(groups: int, unlearned: bool = True) -> tuple[str, str]:
    """The Markdown header cells and separator for `summarise`'s groups."""
    names = "mean | min | < 0.5 |" if unlearned else "mean | min |"
    head = "".join(f" group {g}: {names}" for g in range(groups))
    return head, ("---|---|---|" if unlearned else "---|---|") * groups


def group_cells(rows: list[dict], unlearned: bool = True) -> str:
    """One table row's cells for `summarise(...)`'s output, as group_columns heads them."""
    return "".join(
        f" {g['mean']:.2f} | {g['min']:.2f} |" + (f" {g['unlearned']} |" if unlearned else "")
        for g in rows
    )


def markdown(results: list[dict], groups: int) -> str:
    head, rule = group_columns(groups)
    lines = ["| model | final reward |" + head, "|---|---|" + rule]
    for r in results:
        reward = "—" if r["reward"] is None else f"{r['reward']:.3f}"
        lines.append(f"| {r['model']} | {reward} |{group_cells(r['groups'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the grid's output directory")
    ap.add_argument("--task", required=True)
    ap.add_argument("--groups", type=int, default=1, help="split positions by index mod this")
    ap.add_argument("--prompts", type=int, default=256, help="held-out prompts")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    if args.groups < 1:
        ap.error(f"--groups must be ≥ 1, got {args.groups}")
    if not (args.out / "shared" / "teachers" / args.task).is_dir():
        ap.error(f"no teacher for task {args.task!r} under {args.out}/shared/teachers")
    torch.set_num_threads(1)
    results = measure(args.out, args.task, args.groups, args.prompts)
    print(f"{args.task}, {args.prompts} held-out prompts, {platform.node()}, "
          f"{datetime.date.today()}\n")  # fmt: skip
    print(markdown(results, args.groups))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
