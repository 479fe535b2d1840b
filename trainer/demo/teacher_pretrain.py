"""Supervised pre-training of the demo's teacher, cached on disk after the first run.

The teacher is a small Llama (teacher_service.random_model.build_config) trained with
cross-entropy on the correct responses of fresh random task examples, then saved with
save_pretrained + the shared word-level tokenizer: a directory the teacher service
loads. The cache key hashes the task and the recipe, so changing either retrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaForCausalLM

from teacher_service.random_model import build_config, build_tokenizer
from trainer.demo.task import TaskSpec, full_sequence, make_example

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSize:
    hidden: int
    layers: int
    heads: int
    max_positions: int = 64


@dataclass(frozen=True)
class TeacherRecipe:
    """Teacher size and its supervised training."""

    size: ModelSize = ModelSize(hidden=128, layers=2, heads=4)
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


def new_model(spec: TaskSpec, size: ModelSize, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama (transformers' default init, std 0.02)."""
    torch.manual_seed(seed)
    config = build_config(spec.vocab_size, size.hidden, size.layers, size.heads, size.max_positions)
    return LlamaForCausalLM(config).float()


def save_model(lm: LlamaForCausalLM, spec: TaskSpec, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(spec.vocab_size).save_pretrained(out_dir)
    return out_dir


def cache_key(spec: TaskSpec, recipe: TeacherRecipe) -> str:
    blob = json.dumps({"task": asdict(spec), "recipe": asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def supervised_train(
    lm: LlamaForCausalLM,
    batches: Callable[[], torch.Tensor],
    prompt_len: int,
    steps: int,
    lr: float,
    desc: str,
) -> float:
    """Cross-entropy on the response part of `batches()` ([B, L] ids, prompt first);
    one-cycle LR. Returns the last loss."""
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    lm.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    loss = torch.zeros(())
    for _ in bar:
        ids = batches()
        logits = lm(ids).logits[:, prompt_len - 1 : -1]  # predict the response tokens
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, prompt_len:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return float(loss)


def pretrain_teacher(cache_dir: str | Path, spec: TaskSpec, recipe: TeacherRecipe) -> Path:
    """Returns the teacher's model directory, training it only when it is not cached."""
    out = Path(cache_dir) / f"teacher-{cache_key(spec, recipe)}"
    if (out / "done.json").is_file():
        log.info("teacher cached at %s", out)
        return out
    lm = new_model(spec, recipe.size, recipe.seed)
    rng = random.Random(recipe.seed)
    t0 = time.perf_counter()
    supervised_train(
        lm,
        lambda: torch.tensor(
            [full_sequence(make_example(rng, spec)) for _ in range(recipe.batch_size)]
        ),
        spec.prompt_len,
        recipe.steps,
        recipe.lr,
        "teacher pre-training",
    )
    tmp = out.with_name(out.name + ".tmp")
    save_model(lm.eval(), spec, tmp)
    (tmp / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    tmp.rename(out)
    return out
