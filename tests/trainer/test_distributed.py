"""DDP: two gloo processes train one student; their parameters agree, both ranks' data
reached the update, and only rank 0 writes checkpoints and logs."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.trainer.test_train_fixtures import tiny_config
from trainer.train import prompt_indices, train

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(root: Path):
    """Two micro-batches per step, so DDP's no_sync accumulation path runs too."""
    config = tiny_config(root, root / "ddp")
    return dataclasses.replace(config, optim=dataclasses.replace(config.optim, accum_steps=2))


def _worker(rank: int, root: str, port: int) -> None:
    # What torchrun sets for each process (trainer/distributed.py reads these).
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    result = train(_config(Path(root)))
    state = {k: v.detach().clone() for k, v in result.student.state_dict().items()}
    torch.save(state, Path(root) / f"params-rank{rank}.pt")  # the test's own record


def test_two_process_gloo_run_keeps_ranks_in_sync(tmp_path: Path) -> None:
    config = _config(tmp_path)  # builds the models once, up front
    mp.spawn(_worker, args=(str(tmp_path), _free_port()), nprocs=WORLD, join=True)

    p0 = torch.load(tmp_path / "params-rank0.pt")
    p1 = torch.load(tmp_path / "params-rank1.pt")
    assert all(torch.equal(p0[k], p1[k]) for k in p0)  # DDP kept the replicas identical

    # Ranks trained on different prompts, and rank 1's gradients reached the update: a
    # single process on rank 0's prompts alone ends somewhere else.
    n = len(Path(config.data.prompts).read_text().splitlines())
    assert prompt_indices(n, 5, 0, 0, 2, 0, WORLD, 2) != prompt_indices(n, 5, 0, 0, 2, 1, WORLD, 2)
    solo_cfg = dataclasses.replace(
        config, run=dataclasses.replace(config.run, out_dir=str(tmp_path / "solo"))
    )
    solo = train(solo_cfg).student.state_dict()
    assert any(not torch.equal(solo[k], p0[k]) for k in p0)

    # Only rank 0 wrote: one metrics row per step, one checkpoint, its weights = rank 0's.
    out = tmp_path / "ddp"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, config.run.steps + 1))
    saved = load_file(out / "checkpoint" / "model" / "model.safetensors")
    assert all(torch.equal(saved[k], p0[k]) for k in saved)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "config.json", "metrics.jsonl"]
