"""Rewards: the built-ins on random cases, the "module:function" plugin, the [J, B] table."""

from __future__ import annotations

import random

import pytest
import torch

from trainer.rewards import exact_match, resolve_reward, score_rewards, stopped, token_accuracy


def length_reward(prompt, response, meta) -> float:
    """A plugin reward for the test: the response length."""
    return float(len(response))


def test_builtins_on_random_answers(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        answer = [rng.randrange(5, 100) for _ in range(rng.randrange(1, 8))]
        meta = {"answer": answer}
        assert exact_match([1], [*answer, 2], meta) == 1.0
        assert token_accuracy([1], [*answer, 2], meta) == 1.0
        assert exact_match([1], answer, meta) == 0.0  # did not stop
        wrong = list(answer)
        i = rng.randrange(len(wrong))
        wrong[i] += 1
        assert exact_match([1], [*wrong, 2], meta) == 0.0
        assert token_accuracy([1], [*wrong, 2], meta) == pytest.approx(1 - 1 / len(answer))
        longer = [*answer, 7, 7, 2]  # extra tokens cost like missing ones
        assert token_accuracy([1], longer, meta) == pytest.approx(len(answer) / (len(answer) + 2))
        assert stopped([1], [*wrong, 2], meta) == 1.0 and stopped([1], wrong, meta) == 0.0
        assert exact_match([1], [*answer, 9], {**meta, "_stop_ids": (9,)}) == 1.0


def test_plugin_by_module_function_name() -> None:
    fn = resolve_reward("tests.trainer.test_rewards:length_reward")
    assert fn is length_reward
    assert resolve_reward("exact_match") is exact_match
    for bad in ("nope", "tests.trainer.test_rewards:missing", "no_such_module_xyz:fn"):
        with pytest.raises(ValueError, match="reward"):
            resolve_reward(bad)


def test_score_rewards_table(seed: int) -> None:
    rng = random.Random(seed)
    B = rng.randrange(1, 12)
    responses = [[rng.randrange(5, 9) for _ in range(rng.randrange(0, 6))] for _ in range(B)]
    metas = [{"answer": [5, 6]} for _ in range(B)]
    table = score_rewards([length_reward, token_accuracy], [[1]] * B, responses, metas)
    assert table.shape == (2, B) and table.dtype == torch.float32
    assert table[0].tolist() == [float(len(r)) for r in responses]
    assert table[1].tolist() == pytest.approx(
        [token_accuracy([1], r, m) for r, m in zip(responses, metas, strict=True)]
    )
