"""The grid's diagnostic scripts (benchmarks/experiment_position_accuracy.py and
experiment_student_ceiling.py): per-position accuracy matches a position-by-position
recomputation, and the ceiling script trains the student size it names."""

from __future__ import annotations

import random

import pytest
import torch

from benchmarks.experiment_position_accuracy import position_accuracy, summarise
from benchmarks.experiment_student_ceiling import curve
from trainer.demo.teacher_pretrain import ModelSize, new_model
from trainer.experiment.models import eval_examples
from trainer.tasks import get_task


def test_position_accuracy_is_the_teacher_forced_argmax_at_each_answer_position() -> None:
    task = get_task(random.choice(["trace", "reversal"]))
    lm = new_model(task, ModelSize(hidden=16, layers=1, heads=2), random.randrange(100)).eval()  # type: ignore[arg-type]
    examples = eval_examples(task, 6)
    acc = position_accuracy(lm, task, examples)
    n = len(examples[0]["answer"])
    assert acc.shape == (n,)
    expected = torch.zeros(n)
    for e in examples:  # one prefix at a time, no batching: an independent computation
        for t in range(n):
            prefix = torch.tensor([[*e["prompt"], *e["answer"][:t]]])
            with torch.no_grad():
                nxt = lm(prefix).logits[0, -1].argmax().item()
            expected[t] += float(nxt == e["answer"][t]) / len(examples)
    assert torch.allclose(acc, expected, atol=1e-6)


def test_summarise_splits_positions_by_index_mod_groups() -> None:
    groups = random.randrange(1, 4)
    acc = torch.rand(random.randrange(groups, 30))
    rows = summarise(acc, groups)
    assert len(rows) == groups
    for g, row in enumerate(rows):
        part = [a for i, a in enumerate(acc.tolist()) if i % groups == g]
        assert row["mean"] == pytest.approx(sum(part) / len(part))
        assert row["min"] == pytest.approx(min(part))
        assert row["unlearned"] == sum(a < 0.5 for a in part)


def test_student_ceiling_reports_each_interval_and_learns_from_true_answers() -> None:
    every = random.choice([3, 4])
    points = curve("reversal", heads=2, seed=random.randrange(10), steps=2 * every, every=every,
                   groups=1)  # fmt: skip
    assert [p["step"] for p in points] == [every, 2 * every]
    assert all(0.0 <= p["reward"] <= 1.0 and len(p["groups"]) == 1 for p in points)
    assert points[-1]["loss"] < 5.5  # cross-entropy fell below its start, ln 256 ≈ 5.55
