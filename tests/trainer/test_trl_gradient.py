"""The TRL trainer applies the built-in loop's gradient: for one fixed batch of rollouts,
scored by a real teacher service process, the gradient that reaches the optimizer in
HybridGRPOTrainer equals the one trainer.train.train() applies (fp32, 1e-5 relative).

Both runs take one optimizer step with clipping off; the gradients are read by an
optimizer step pre-hook, i.e. exactly what each optimizer would apply. The rollouts are
fixed (random prompts and completions, fresh per run) so that both see the same batch:
the built-in loop through its `sample`, TRL through its `rollout_func` hook (the path
that replaces generation). Everything after generation is each trainer's own code.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForCausalLM, AutoTokenizer

import trainer.train as builtin
from tests.trainer.client_fixtures import ServerProcess
from tests.trainer.test_train_fixtures import tiny_config, tiny_models
from tests.trainer.trl_fixtures import demo_rows, grpo_args
from trainer.config import OptimConfig, RolloutConfig, TeacherSpec
from trainer.integrations.trl_layout import rollout_batch, student_topk_and_logprobs
from trainer.integrations.trl_rewards import trl_reward
from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer
from trainer.rollout import Rollouts

P, G, R = 3, 2, 5  # prompts, completions per prompt, max completion length


class GradCapture:
    """Records every parameter's gradient when an optimizer is about to step."""

    def __enter__(self) -> GradCapture:
        self.grads: dict[torch.nn.Parameter, torch.Tensor] = {}

        def hook(opt: torch.optim.Optimizer, *_: object) -> None:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self.grads[p] = p.grad.detach().clone()

        self._handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def by_name(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: self.grads[p] for n, p in model.named_parameters() if p in self.grads}


def fixed_rollouts(rows: list[dict], rng: random.Random) -> list[list[list[int]]]:
    """G random completions per prompt: symbols, some ending with <eos> (id 2)."""
    out = []
    for _ in rows:
        group = []
        for _ in range(G):
            n = rng.randrange(1, R + 1)
            ids = [rng.randrange(3, 40) for _ in range(n)]
            if rng.random() < 0.5:
                ids[-1] = 2
            group.append(ids)
        out.append(group)
    return out


def test_trl_trainer_gradient_equals_builtin_loop(tmp_path: Path, seed: int, monkeypatch) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    teacher_dir, student_dir = tiny_models(tmp_path)
    rows = demo_rows(P, seed)
    assert len({r["prompt"] for r in rows}) == P  # rollout_func looks completions up by prompt
    completions = fixed_rollouts(rows, rng)
    server = ServerProcess(teacher_dir).wait_ready()
    try:
        spec = TeacherSpec(name="t", endpoints=(server.address,))
        base = tiny_config(tmp_path, tmp_path / "builtin", teachers=(spec,))
        config = dataclasses.replace(
            base,
            run=dataclasses.replace(base.run, steps=1, seed=seed % 1000),
            rollout=RolloutConfig(prompts_per_step=P, group_size=G, max_new_tokens=R),
            optim=OptimConfig(lr=1e-3, grad_clip=0.0),
        )
        tokenizer = AutoTokenizer.from_pretrained(student_dir)

        # The built-in loop, its sampler replaced by the fixed batch.
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        prompt_ids = [r["prompt_ids"] for r in rows for _ in range(G)]
        responses = [c for group in completions for c in group]
        layout = rollout_batch(prompt_ids, responses, G, tokenizer.pad_token_id)
        topk, _ = student_topk_and_logprobs(student, layout, config.dense.k)
        metas = [{**r, "_stop_ids": (2,)} for r in rows for _ in range(G)]
        fixed = Rollouts(prompt_ids, responses, metas, topk, G)
        monkeypatch.setattr(builtin, "sample", lambda *a, **k: fixed)
        with GradCapture() as cap:
            result = builtin.train(config)
        want = cap.by_name(result.student)

        # TRL: the same batch through rollout_func, TRL's reward functions, our loss.
        by_text = {r["prompt"]: (r["prompt_ids"], completions[i]) for i, r in enumerate(rows)}

        def rollout_func(prompts: list[str], trainer: object) -> dict:
            seen: dict[str, int] = {}
            out_p, out_c = [], []
            for text in prompts:
                ids, group = by_text[text]
                out_p.append(ids)
                out_c.append(group[seen.setdefault(text, 0)])
                seen[text] += 1
            return {"prompt_ids": out_p, "completion_ids": out_c, "logprobs": None}

        args = grpo_args(
            tmp_path / "trl",
            per_device_train_batch_size=P * G,
            num_generations=G,
            max_completion_length=R,
            max_steps=1,
            learning_rate=1e-3,
            reward_weights=[r.weight for r in config.rewards],
            seed=seed % 1000,
        )
        trainer = HybridGRPOTrainer(
            model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
            reward_funcs=[trl_reward(r.fn) for r in config.rewards],
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            rollout_func=rollout_func,
            hybrid=HybridConfig(teachers=(spec,), dense=config.dense, sparse=config.sparse),
        )
        with GradCapture() as cap:
            trainer.train()
        got = cap.by_name(trainer.model)
    finally:
        server.close()

    assert set(got) == set(want) and want
    for name, g in want.items():
        rel = float((got[name] - g).norm() / g.norm().clamp_min(1e-30))
        assert rel <= 1e-5, (name, rel)
    assert max(float(g.norm()) for g in want.values()) > 0  # not a vacuous comparison
