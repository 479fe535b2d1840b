"""The experiment grid's synthetic tasks: every example has the declared shape and ids,
each answer is what its task says (checked by an independent computation), and the
teachers' training targets differ from the answers only where the task says."""

from __future__ import annotations

import random

import pytest

from trainer.tasks import TASKS, get_task
from trainer.tasks.base import BOS, FIRST_SYMBOL, SEP


@pytest.mark.parametrize("name", sorted(TASKS))
def test_examples_have_the_declared_shape_and_symbol_ids(name: str) -> None:
    task, rng = get_task(name), random.Random(random.randrange(2**32))
    for _ in range(50):
        ex = task.make_example(rng)
        assert len(ex["prompt"]) == task.prompt_len
        assert len(ex["answer"]) == task.response_len - 1  # <eos> is not part of the answer
        assert ex["prompt"][0] == BOS and ex["prompt"][-1] == SEP
        for tok in (*ex["prompt"][1:-1], *ex["answer"]):
            assert FIRST_SYMBOL <= tok < task.vocab_size


def _digits(ex: dict) -> list[int]:
    return [t - FIRST_SYMBOL for t in ex["prompt"][1:-1]]


@pytest.mark.parametrize("name", ["trace", "trace_apart"])
def test_trace_writes_each_digit_then_the_running_sum(name: str) -> None:
    task, rng = get_task(name), random.Random(random.randrange(2**32))
    sum_ids = FIRST_SYMBOL + (10 if name == "trace_apart" else 0)
    for _ in range(50):
        ex = task.make_example(rng)
        ds, ans = _digits(ex), ex["answer"]
        assert [t - FIRST_SYMBOL for t in ans[0::2]] == ds
        assert [t - sum_ids for t in ans[1::2]] == [sum(ds[: i + 1]) % 10 for i in range(len(ds))]
        digit_ids, sum_id_set = set(ans[0::2]), set(ans[1::2])
        assert digit_ids <= set(range(FIRST_SYMBOL, FIRST_SYMBOL + 10))
        assert sum_id_set <= set(range(sum_ids, sum_ids + 10))


def test_reversal_answer_is_the_prompt_reversed() -> None:
    task, rng = get_task("reversal"), random.Random(random.randrange(2**32))
    for _ in range(50):
        ex = task.make_example(rng)
        assert ex["answer"] == ex["prompt"][1:-1][::-1]
        assert task.teacher_answer(ex, rng) == ex["answer"]


def test_flawed_teacher_copies_on_the_lower_half_at_its_wrong_rate() -> None:
    task, rng = get_task("flawed"), random.Random(random.randrange(2**32))
    copied = lower = 0
    for _ in range(4000):
        ex = task.make_example(rng)
        target = task.teacher_answer(ex, rng)
        if ex["prompt"][1] - FIRST_SYMBOL < task.alphabet // 2:
            lower += 1
            copied += target == ex["prompt"][1:-1] and target != ex["answer"]
        else:
            assert target == ex["answer"]
    # Binomial(lower, 0.7): 5 standard deviations either side.
    sd = (lower * 0.7 * 0.3) ** 0.5
    assert abs(copied - 0.7 * lower) < 5 * sd + 0.01 * lower  # palindromes count as right
