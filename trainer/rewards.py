"""Rewards: a small plugin interface and the built-ins the demo uses.

A reward is any Python callable

    fn(prompt_ids: Sequence[int], response_ids: Sequence[int], meta: Mapping) -> float

named in the config by a built-in name ("exact_match", "token_accuracy", "stopped") or as
"package.module:function". `response_ids` is what the student sampled, ending with its
stop token when it stopped; `meta` is the rest of the prompt's JSONL line (e.g. "answer").
Several rewards combine as r = Σ_j α_j r_j (MATH.md § Schedules and extensions); the
trainer calls `score_rewards` once per batch and hands the [J, B] table to the objective.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch

RewardFn = Callable[[Sequence[int], Sequence[int], Mapping], float]

# Stop ids the built-ins strip from the end of a response before comparing; the trainer
# passes its own via meta["_stop_ids"] when they differ.
_DEFAULT_STOP = (2,)


def _strip_stop(response: Sequence[int], meta: Mapping) -> list[int]:
    stops = meta.get("_stop_ids", _DEFAULT_STOP)
    out = list(response)
    if out and out[-1] in stops:
        out.pop()
    return out


def exact_match(prompt: Sequence[int], response: Sequence[int], meta: Mapping) -> float:
    """1 when the response (without its stop token) equals meta["answer"] and stopped."""
    stopped = bool(response) and response[-1] in meta.get("_stop_ids", _DEFAULT_STOP)
    return float(stopped and _strip_stop(response, meta) == list(meta["answer"]))


def token_accuracy(prompt: Sequence[int], response: Sequence[int], meta: Mapping) -> float:
    """Fraction of answer positions the response gets right, divided by max(len) so that
    extra tokens cost as much as missing ones. A dense-ish signal for the demo task."""
    answer = list(meta["answer"])
    got = _strip_stop(response, meta)
    hits = sum(a == b for a, b in zip(answer, got, strict=False))
    return hits / max(len(answer), len(got), 1)


def stopped(prompt: Sequence[int], response: Sequence[int], meta: Mapping) -> float:
    """1 when the response ended with a stop token within the length budget."""
    return float(bool(response) and response[-1] in meta.get("_stop_ids", _DEFAULT_STOP))


BUILTINS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "token_accuracy": token_accuracy,
    "stopped": stopped,
}


def resolve_reward(name: str) -> RewardFn:
    """A built-in name or "package.module:function" -> the callable."""
    if name in BUILTINS:
        return BUILTINS[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward {name!r}: expected a built-in {sorted(BUILTINS)} or 'package.module:function'"
        )
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {name!r} cannot be loaded: {exc}") from exc
    if not callable(fn):
        raise ValueError(f"reward {name!r} is not callable")
    return fn


def score_rewards(
    fns: Sequence[RewardFn],
    prompts: Sequence[Sequence[int]],  # B prompts (one per sample)
    responses: Sequence[Sequence[int]],  # B responses
    metas: Sequence[Mapping],  # B metas
) -> torch.Tensor:
    """rewards [J, B] float32: fns[j] applied to every sample."""
    table = [
        [float(fn(p, r, m)) for p, r, m in zip(prompts, responses, metas, strict=True)]
        for fn in fns
    ]
    return torch.tensor(table, dtype=torch.float32).reshape(len(fns), len(prompts))
