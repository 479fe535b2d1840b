"""Rollouts: the student's per-step top-K ids are kept, rows stop at stop ids, groups are
consecutive, left-padding does not change what a prompt samples, the layout lines up."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_service.random_model import save_random_model
from trainer.rollout import ResponseLogits, sample

V = 300


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    path = save_random_model(
        Path(tmp_path_factory.mktemp("rollout")) / "m", V, hidden=32, layers=2, heads=4,
        max_positions=128, seed=3,
    )  # fmt: skip
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _prompts(rng: random.Random, n: int) -> list[list[int]]:
    return [[1] + [rng.randrange(4, V) for _ in range(rng.randrange(1, 9))] for _ in range(n)]


def test_kept_ids_are_the_students_top_k_at_every_step(lm, seed: int) -> None:
    rng = random.Random(seed)
    K, G = rng.randrange(1, 9), rng.randrange(1, 4)
    prompts = _prompts(rng, rng.randrange(1, 5))
    ro = sample(lm, prompts, [{}] * len(prompts), group_size=G, temperature=1.0,
                max_new_tokens=rng.randrange(1, 10), stop_ids=(2,), keep_topk=K, pad_id=0,
                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batch = ro.layout(pad_id=0)
    with torch.no_grad():
        logits = ResponseLogits(lm)(batch.input_ids, batch.positions)  # [B, T, V]
    kth = logits.topk(K, dim=-1).values[..., -1:]  # [B, T, 1]
    kept = logits.gather(-1, batch.student_topk.clamp_min(0))  # [B, T, K]
    valid = batch.mask.bool()
    assert batch.student_topk.shape[-1] == K
    # Every kept id is among the K largest logits of the full forward (the KV-cache decode
    # and the full forward may differ by float rounding, hence the tolerance).
    assert bool((kept[valid] >= kth[valid] - 1e-4).all())
    assert all(len(set(row.tolist())) == K for row in batch.student_topk[valid])
    assert bool((batch.student_topk[~valid] == -1).all())


def test_rows_stop_at_stop_ids_and_groups_are_consecutive(lm, seed: int) -> None:
    rng = random.Random(seed)
    stops = tuple(rng.sample(range(4, V), 40))  # many stop ids: rows stop early and late
    G, max_new = rng.randrange(2, 5), rng.randrange(1, 12)
    prompts = _prompts(rng, 3)
    ro = sample(lm, prompts, [{"i": i} for i in range(3)], group_size=G, temperature=1.5,
                max_new_tokens=max_new, stop_ids=stops, keep_topk=2, pad_id=0,
                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    assert ro.prompt_ids == [p for p in prompts for _ in range(G)]
    assert [m["i"] for m in ro.metas] == [i for i in range(3) for _ in range(G)]
    for resp in ro.response_ids:
        assert 1 <= len(resp) <= max_new
        assert all(t not in stops for t in resp[:-1])
        assert resp[-1] in stops or len(resp) == max_new


def test_left_padding_does_not_change_a_prompts_samples(lm, seed: int) -> None:
    rng = random.Random(seed)
    prompts = _prompts(rng, 4)
    kw = dict(group_size=1, temperature=0.0, max_new_tokens=6, stop_ids=(2,), keep_topk=3, pad_id=0)
    together = sample(lm, prompts, [{}] * 4, **kw)
    for i, p in enumerate(prompts):
        alone = sample(lm, [p], [{}], **kw)
        assert alone.response_ids[0] == together.response_ids[i]


def test_same_seed_same_samples_and_layout_lines_up(lm, seed: int) -> None:
    rng = random.Random(seed)
    prompts = _prompts(rng, 3)
    kw = dict(group_size=2, temperature=1.0, max_new_tokens=8, stop_ids=(2,), keep_topk=4, pad_id=0)
    a = sample(lm, prompts, [{}] * 3, generator=torch.Generator().manual_seed(seed), **kw)
    b = sample(lm, prompts, [{}] * 3, generator=torch.Generator().manual_seed(seed), **kw)
    assert a.response_ids == b.response_ids
    batch = a.layout(pad_id=0)
    for row, (p, r) in enumerate(zip(a.prompt_ids, a.response_ids, strict=True)):
        n = len(r)
        assert batch.mask[row].sum() == n and int(batch.starts[row]) == len(p)
        assert batch.targets[row, :n].tolist() == r
        assert batch.input_ids[row, batch.positions[row, :n] + 1].tolist() == r
