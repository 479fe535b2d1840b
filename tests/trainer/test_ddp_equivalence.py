"""The built-in loop's data parallelism, proven rather than assumed.

Two gloo processes with gradient accumulation (accum_steps = 2) must apply the same
gradient as one process on the union of their batches (fp32, 1e-5 relative); the
prompts each rank trains on, as train() records them, must be disjoint and together
cover the step's batch; and a run under a cosine LR schedule and DDP that is interrupted
after a checkpoint and resumed must end where the uninterrupted run ends.

These fail on the two broken versions found by mutating the loop: every rank training on
rank 0's prompts (the records overlap, the gradient differs from the union's) and
accumulation without dividing the loss (the DDP gradient is accum × the union's).

Rollouts for the gradient comparison come from a deterministic stand-in for `sample`
(responses a fixed function of the prompt), so that two runs that partition the batch
differently still see the same samples; everything after sampling is the loop's own.
One `mp.spawn` runs all the distributed parts; the tests read what it saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.optim.optimizer import register_optimizer_step_pre_hook

import trainer.train as loop
from tests.trainer.test_train_fixtures import tiny_config
from trainer.config import OptimConfig, RolloutConfig
from trainer.integrations.trl_layout import student_topk_and_logprobs
from trainer.rollout import Rollouts

WORLD, ACCUM, P, G, R = 2, 2, 2, 2, 4  # ranks, micro-batches, prompts per micro-batch, G, T


def fixed_sample(lm, prompts, metas, *, group_size, max_new_tokens, keep_topk, pad_id, **_):
    """`sample` with responses a deterministic function of the prompt (and the student's
    real top-K ids at the current weights)."""
    rows = [list(p) for p in prompts for _ in range(group_size)]
    responses = []
    for b, p in enumerate(rows):
        s, j = sum(p), b % group_size
        n = 1 + (s + j) % max_new_tokens
        resp = [5 + (s * (j + 3) + 7 * i) % 35 for i in range(n)]
        if (s + j) % 2 == 0:
            resp[-1] = 2
        responses.append(resp)
    row_metas = [m for m in metas for _ in range(group_size)]
    placeholder = Rollouts(
        rows, responses, row_metas, torch.full((len(rows), 1, 1), -1), group_size
    )
    topk, _ = student_topk_and_logprobs(lm, placeholder.layout(pad_id), keep_topk)
    return Rollouts(rows, responses, row_metas, topk, group_size)


def union_config(root: Path, out: str, world: int):
    """One step; clipping off (it would hide a scaled gradient); `world` splits the batch."""
    base = tiny_config(root, root / out)
    # DDP: P prompts per rank and micro-batch; alone: all ACCUM·P·WORLD in one micro-batch.
    per_micro, accum = (P, ACCUM) if world > 1 else (ACCUM * P * WORLD, 1)
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, steps=1, resume=False),
        rollout=RolloutConfig(prompts_per_step=per_micro, group_size=G, max_new_tokens=R),
        optim=OptimConfig(lr=1e-3, grad_clip=0.0, accum_steps=accum),
    )


def cosine_config(root: Path, out: str):
    """Four steps, warm-up then cosine decay, a checkpoint every two steps."""
    base = tiny_config(root, root / out)
    return dataclasses.replace(
        base,
        run=dataclasses.replace(base.run, steps=4, save_every=2, resume=True),
        optim=OptimConfig(lr=1e-2, warmup_steps=1, decay="cosine", accum_steps=ACCUM),
    )


def capture_grads(result_holder: dict) -> object:
    def hook(opt: torch.optim.Optimizer, *_: object) -> None:
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    result_holder[p] = p.grad.detach().clone()

    return register_optimizer_step_pre_hook(hook)


class Interrupted(RuntimeError):
    pass


def _worker(rank: int, root: str, ports: list[int]) -> None:
    base = Path(root)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    real_indices, real_sample = loop.prompt_indices, loop.sample

    # 1. One step, two ranks × two micro-batches, deterministic rollouts.
    os.environ["MASTER_PORT"] = str(ports[0])
    loop.sample = fixed_sample
    grads: dict = {}
    handle = capture_grads(grads)
    result = loop.train(union_config(base, "ddp-union", WORLD))
    handle.remove()
    loop.sample = real_sample
    named = {n: grads[p] for n, p in result.student.named_parameters()}
    torch.save({"grads": named, "prompts": result.prompts}, base / f"union-rank{rank}.pt")

    # 2. Cosine schedule under DDP: straight through, then interrupted after the step-2
    # checkpoint (every rank stops at the start of step 3) and resumed.
    os.environ["MASTER_PORT"] = str(ports[1])
    straight = loop.train(cosine_config(base, "straight"))
    os.environ["MASTER_PORT"] = str(ports[2])

    def stop_at_step_2(n, seed, step, *rest):
        if step == 2:
            raise Interrupted
        return real_indices(n, seed, step, *rest)

    loop.prompt_indices = stop_at_step_2
    # The process group stays up, as after a crash that spares the launcher.
    with contextlib.suppress(Interrupted):
        loop.train(cosine_config(base, "resumed"))
    loop.prompt_indices = real_indices
    resumed = loop.train(cosine_config(base, "resumed"))
    torch.save(
        {
            "straight": {k: v.detach().clone() for k, v in straight.student.state_dict().items()},
            "resumed": {k: v.detach().clone() for k, v in resumed.student.state_dict().items()},
            "resumed_steps": sorted(resumed.prompts),
            "lr": [h["lr"] for h in straight.history],
            "resumed_lr": [h["lr"] for h in resumed.history],
        },
        base / f"cosine-rank{rank}.pt",
    )


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    tiny_config(root, root / "warm")  # builds the models and prompts once, up front
    mp.spawn(_worker, args=(str(root), _free_ports(3)), nprocs=WORLD, join=True)
    return root


@pytest.mark.slow
def test_ddp_with_accumulation_applies_the_union_batch_gradient(
    ddp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "sample", fixed_sample)
    grads: dict = {}
    handle = capture_grads(grads)
    try:
        solo = loop.train(union_config(ddp_runs, "solo-union", 1))
    finally:
        handle.remove()
    want = {n: grads[p] for n, p in solo.student.named_parameters()}
    for rank in range(WORLD):
        got = torch.load(ddp_runs / f"union-rank{rank}.pt")["grads"]
        assert set(got) == set(want)
        for name, g in want.items():
            rel = float((got[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel <= 1e-5, (rank, name, rel)
    assert max(float(g.norm()) for g in want.values()) > 0


@pytest.mark.slow
def test_ranks_train_on_disjoint_prompts_that_cover_the_step_batch(ddp_runs: Path) -> None:
    records = [torch.load(ddp_runs / f"union-rank{r}.pt")["prompts"] for r in range(WORLD)]
    per_rank = [[i for micro in rec[0] for i in micro] for rec in records]  # step 0
    assert all(len(rec[0]) == ACCUM for rec in records)  # one record per micro-batch
    assert all(len(ids) == len(set(ids)) == ACCUM * P for ids in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1])  # disjoint across ranks
    n = len((ddp_runs / "prompts.jsonl").read_text().splitlines())
    seed = union_config(ddp_runs, "x", 1).run.seed
    step_batch = loop.prompt_indices(n, seed, 0, 0, 1, 0, 1, ACCUM * P * WORLD)
    assert set(per_rank[0]) | set(per_rank[1]) == set(step_batch)  # and cover the batch


@pytest.mark.slow
def test_interrupted_cosine_ddp_run_resumes_to_the_same_weights(ddp_runs: Path) -> None:
    for rank in range(WORLD):
        rec = torch.load(ddp_runs / f"cosine-rank{rank}.pt")
        assert rec["resumed_steps"] == [2, 3]  # the resumed call ran only the last two steps
        assert rec["resumed_lr"] == rec["lr"][2:]  # the cosine schedule continued, not restarted
        assert len(set(rec["lr"])) == 4  # warm-up then decay: every step a different LR
        for name, want in rec["straight"].items():
            torch.testing.assert_close(rec["resumed"][name], want, rtol=1e-5, atol=1e-7)
