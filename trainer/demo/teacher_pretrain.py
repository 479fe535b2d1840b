"""Supervised pre-training of the demo's teacher, cached on disk after the first run.

The teacher is a small Llama (teacher_service.random_model.build_config) trained with
cross-entropy on the correct responses of fresh random task examples, then saved with
save_pretrained + the shared word-level tokenizer: a directory the teacher service
loads. The cache key hashes the task and the recipe, so changing either retrains.

Corrupted prefixes (`TeacherRecipe.corrupt`): on-policy distillation asks the teacher
about the *student's* prefixes, which early in training are mostly wrong. A teacher
trained only with teacher forcing on correct prefixes learns a shortcut for reversal
(output the prompt symbol just before the one it last wrote), which can be confidently
wrong after a mistake and would then teach the student to continue its errors. So some
response tokens in the teacher's *input* are replaced by random ids while the targets
stay correct: the right next token depends only on the prompt and the position, and the
teacher learns exactly that. One extra position after <eos> (target <eos> again) teaches
it to stop a student that ran past the answer. (Measured: in the demo as configured a
teacher trained without corruption taught the student just as well; docs/results.md.)
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
from trainer.demo.task import EOS, FIRST_SYMBOL, TaskSpec, full_sequence, make_example

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
    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    # Per sequence, each response input token is replaced by a random id with a
    # probability drawn uniformly from [0, corrupt] (so clean sequences are seen too).
    corrupt: float = 0.5


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


def corrupted_batch(
    rng: random.Random, spec: TaskSpec, batch_size: int, corrupt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both [B, prompt_len + response_len + 1]: correct sequences plus
    a trailing <eos>, with response input tokens replaced by random ids (half of them
    symbols, half any non-special id) at a per-sequence rate in [0, corrupt]."""
    targets, inputs = [], []
    for _ in range(batch_size):
        seq = [*full_sequence(make_example(rng, spec)), EOS]
        noisy = list(seq)
        rate = rng.uniform(0.0, corrupt)
        for i in range(spec.prompt_len, len(seq) - 1):  # the response tokens fed as input
            if rng.random() < rate:
                if rng.random() < 0.5:
                    noisy[i] = FIRST_SYMBOL + rng.randrange(spec.alphabet)
                else:
                    noisy[i] = rng.randrange(3, spec.vocab_size)
        targets.append(seq)
        inputs.append(noisy)
    return torch.tensor(inputs), torch.tensor(targets)


def supervised_train(
    lm: LlamaForCausalLM,
    batches: Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    prompt_len: int,
    steps: int,
    lr: float,
    desc: str,
) -> float:
    """Cross-entropy on the response part of `batches()` ([B, L] ids, prompt first, or an
    (inputs, targets) pair of [B, L]: targets[:, t] is predicted from inputs[:, :t]);
    one-cycle LR. Returns the last loss."""
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    # OneCycleLR ends its warm-up at step pct_start·steps − 1 and divides by that: a
    # warm-up of exactly one step (10 % of 10 steps) would be a division by zero.
    pct_start = 0.1 if abs(0.1 * steps - 1.0) > 1e-9 else 0.15
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=pct_start)
    lm.train()
    bar = tqdm(range(steps), desc=desc, unit="step")
    loss = torch.zeros(())
    for _ in bar:
        batch = batches()
        inputs, targets = batch if isinstance(batch, tuple) else (batch, batch)
        logits = lm(inputs).logits[:, prompt_len - 1 : -1]  # predict the response tokens
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, prompt_len:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return float(loss.detach())


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
        lambda: corrupted_batch(rng, spec, recipe.batch_size, recipe.corrupt),
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
