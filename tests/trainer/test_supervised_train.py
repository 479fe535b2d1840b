"""supervised_train (teacher pre-training and warm starts) runs for every step count."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.demo.teacher_pretrain import supervised_train


@pytest.mark.parametrize("steps", [1, 2, 9, 10, 11])
def test_supervised_train_runs_for_short_schedules(steps: int) -> None:
    torch.manual_seed(steps)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    lm = LlamaForCausalLM(config)
    before = [p.detach().clone() for p in lm.parameters()]
    loss = supervised_train(
        lm, lambda: torch.randint(0, 32, (4, 8)), prompt_len=3, steps=steps, lr=1e-2, desc="t"
    )
    assert math.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, lm.parameters(), strict=True))
