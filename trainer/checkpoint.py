"""Checkpoints: safetensors for tensors, JSON for the rest; resuming is exact.

A checkpoint is a directory `<out_dir>/checkpoint/`:

    model/              the student, save_pretrained (safetensors + config.json) plus its
                        tokenizer, so the checkpoint is itself a model directory that the
                        teacher service or an evaluation can load
    optimizer.safetensors   every optimizer state tensor, named state.<param index>.<key>
    rng.safetensors     torch CPU (and CUDA) generator states
    state.json          step, optimizer hyper-parameters, LR scheduler state, Python RNG,
                        the run's config

It is written into `checkpoint.tmp/` and renamed over the old one, so a crash while
saving leaves the previous checkpoint intact. Loading restores all of it; with the
trainer's per-step sampling seeds this makes the next step's loss bit-identical to an
uninterrupted run (tests/trainer/test_checkpoint.py).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_DIR = "checkpoint"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Splits optimizer.state_dict() into named tensors and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(
    out_dir: str | Path,
    lm: nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: dict[str, Any],
) -> Path:
    """Writes the checkpoint for `step` (steps completed) and returns its directory."""
    final = Path(out_dir) / CHECKPOINT_DIR
    tmp = final.with_name(CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lm.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    tensors, opt_rest = _optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda_{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    state = {
        "step": step,
        "optimizer": opt_rest,
        "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(),
        "config": config,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    old = final.with_name(CHECKPOINT_DIR + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def has_checkpoint(out_dir: str | Path) -> bool:
    return (Path(out_dir) / CHECKPOINT_DIR / "state.json").is_file()


def load_checkpoint(
    out_dir: str | Path,
    lm: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    """Restores model, optimizer, scheduler and RNG in place; returns the completed steps."""
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    state = json.loads((ckpt / "state.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for f in sorted((ckpt / "model").glob("*.safetensors")):
        weights.update(load_file(f))
    missing, unexpected = lm.load_state_dict(weights, strict=False)
    # save_pretrained may drop tied weights; anything else missing is a real mismatch.
    tied = set(getattr(lm, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")

    tensors = load_file(ckpt / "optimizer.safetensors")
    rest = state["optimizer"]
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        opt_state.setdefault(int(idx), {})[key] = value
    for idx, scalars in rest["scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": rest["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])

    rng = load_file(ckpt / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return int(state["step"])
