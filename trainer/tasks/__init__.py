"""Synthetic tasks for the experiment grid (docs/results.md), each with a verifiable
reward and a teacher the project trains (teachers.py).

    reversal  reverse 5 symbols of 16                       (response 6 tokens)
    trace     prefix sums of 12 digits, written as a trace  (response 25 tokens)
    trace_apart  the same trace, the sums in their own symbols (response 25 tokens)
    flawed    reversal, but the teacher copies on half the prompts (reward ≠ teacher)
"""

from __future__ import annotations

from trainer.tasks.base import REWARDS, SyntheticTask
from trainer.tasks.flawed import FlawedTeacherTask
from trainer.tasks.reversal import ReversalTask
from trainer.tasks.trace import TraceTask

TASKS: dict[str, SyntheticTask] = {
    "reversal": ReversalTask(),
    "trace": TraceTask(),
    # The student learns this one from true answers in ~250 steps, trace not in 2,000
    # (docs/results.md § "Why trace is slow"); its teacher needs fewer steps too.
    "trace_apart": TraceTask(name="trace_apart", sums_apart=True, teacher_steps=600),
    "flawed": FlawedTeacherTask(),
}


def get_task(name: str) -> SyntheticTask:
    """The task called `name`; a ValueError lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name]


__all__ = ["REWARDS", "TASKS", "SyntheticTask", "get_task"]
