"""A teacher that goes away mid-run, under the TRL trainer: while a second replica lives
the run fails over and goes on; with none left it stops with the client's error naming
the teacher, within the request deadline, never a hang. Teachers are real server
processes, killed with SIGKILL after an optimizer step (a TrainerCallback), while TRL
generates with HF.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from tests.trainer.client_fixtures import ServerProcess
from tests.trainer.test_train_fixtures import tiny_models
from tests.trainer.trl_fixtures import demo_rows, grpo_args
from trainer.client import TeacherError
from trainer.config import DenseConfig, TeacherSpec
from trainer.integrations.trl_rewards import trl_reward
from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer

STEPS, KILL_FIRST, KILL_SECOND = 5, 1, 3


class KillAfterStep(TrainerCallback):
    """SIGKILLs `server` when optimizer step `step` ends; records when."""

    def __init__(self, server: ServerProcess, step: int) -> None:
        self.server, self.step, self.killed_at = server, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and self.killed_at is None:
            self.server.kill()
            self.killed_at = time.monotonic()


def make_trainer(root: Path, endpoints: tuple[str, ...], seed: int) -> HybridGRPOTrainer:
    _, student_dir = tiny_models(root)
    spec = TeacherSpec(name="t", endpoints=endpoints, deadline_s=10.0)
    return HybridGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        reward_funcs=[trl_reward("token_accuracy")],
        args=grpo_args(
            root / "trl",
            per_device_train_batch_size=8,
            num_generations=2,
            max_completion_length=4,
            max_steps=STEPS,
            seed=seed % 1000,
        ),
        train_dataset=Dataset.from_list(demo_rows(64, seed)),
        processing_class=AutoTokenizer.from_pretrained(student_dir),
        hybrid=HybridConfig(teachers=(spec,), dense=DenseConfig(k=8)),
    )


@pytest.mark.slow
def test_replicas_killed_mid_run_fail_over_then_raise_a_clear_error(
    tmp_path: Path, seed: int
) -> None:
    """Replica a dies after step 1: steps 2 and 3 run on b. Then b dies after step 3:
    step 4 raises the client's error, naming the teacher, the endpoints and the step."""
    teacher_dir, _ = tiny_models(tmp_path)
    servers = [ServerProcess(teacher_dir), ServerProcess(teacher_dir)]
    try:
        a, b = (s.wait_ready() for s in servers)
        trainer = make_trainer(tmp_path, (a.address, b.address), seed)
        first, second = KillAfterStep(a, KILL_FIRST), KillAfterStep(b, KILL_SECOND)
        trainer.add_callback(first)
        trainer.add_callback(second)
        with pytest.raises(TeacherError) as info:
            trainer.train()
        waited = time.monotonic() - second.killed_at
    finally:
        for s in servers:
            s.close()
    assert first.killed_at is not None
    # Failed over: the steps after a's death completed, on b alone.
    assert trainer.state.global_step == KILL_SECOND
    # Then a clear error, within the request deadline (never a hang).
    message = str(info.value)
    assert "teacher 't'" in message and a.address in message and b.address in message, message
    assert f"step {KILL_SECOND}" in message, message
    assert waited < 10.0 + 30.0, waited  # deadline_s, plus slack for a busy CI machine
