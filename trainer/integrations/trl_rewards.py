"""The project's rewards (trainer/rewards.py) as TRL reward functions.

TRL calls a reward function as `fn(prompts=, completions=, completion_ids=, **columns)`
with one list entry per completion, the dataset's other columns repeated alongside; the
project's rewards take `(prompt_ids, response_ids, meta)`. `trl_reward` bridges the two:

    reward_funcs = [trl_reward("token_accuracy"), trl_reward("exact_match")]

`response_ids` are TRL's completion ids (they end with the EOS token when the completion
stopped, as the built-in loop's responses end with their stop id); `meta` holds the
row's dataset columns (e.g. "answer") plus "_stop_ids"; `prompt_ids` come from a
"prompt_ids" column when the dataset has one (TRL does not pass the tokenized prompt),
else they are empty. Any TRL reward function can sit beside these in `reward_funcs`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from trainer.rewards import RewardFn, resolve_reward

TRLRewardFn = Callable[..., list[float]]
_TRL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


def trl_reward(fn: str | RewardFn, *, stop_ids: Sequence[int] = (2,)) -> TRLRewardFn:
    """A TRL reward function computing the project reward `fn` (a built-in name,
    "package.module:function", or the callable) on each completion."""
    project_fn = resolve_reward(fn) if isinstance(fn, str) else fn
    stops = tuple(int(s) for s in stop_ids)

    def reward(
        prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Sequence[int]],
        **columns: Any,
    ) -> list[float]:  # fmt: skip
        n = len(completion_ids)
        rows = {
            k: v
            for k, v in columns.items()
            if k not in _TRL_KWARGS and isinstance(v, list) and len(v) == n
        }
        out = []
        for i, ids in enumerate(completion_ids):
            meta = {k: v[i] for k, v in rows.items()} | {"_stop_ids": stops}
            out.append(float(project_fn(list(meta.get("prompt_ids", [])), list(ids), meta)))
        return out

    # TRL logs each reward as rewards/<__name__>/mean.
    reward.__name__ = fn if isinstance(fn, str) else getattr(fn, "__name__", "reward")
    return reward
