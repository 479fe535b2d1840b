"""A teacher that goes away mid-run, under the TRL trainer: with a second replica the run
fails over and completes; with none it stops with the client's error naming the teacher,
within the request deadline, never a hang. Teachers are real server processes, killed
with SIGKILL after an optimizer step (a TrainerCallback), while TRL generates with HF.
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
from tests.trainer.trl_fixtures import client_ids_seen, demo_rows, grpo_args
from trainer.client import TeacherError
from trainer.config import DenseConfig, TeacherSpec
from trainer.integrations.trl_rewards import trl_reward
from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer

STEPS, KILL_AFTER = 4, 1


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
def test_replica_killed_mid_run_fails_over_and_training_completes(
    tmp_path: Path, seed: int
) -> None:
    teacher_dir, _ = tiny_models(tmp_path)
    servers = [ServerProcess(teacher_dir), ServerProcess(teacher_dir)]
    try:
        a, b = (s.wait_ready() for s in servers)
        trainer = make_trainer(tmp_path, (a.address, b.address), seed)
        killer = KillAfterStep(a, KILL_AFTER)
        trainer.add_callback(killer)
        trainer.train()
        assert killer.killed_at is not None
        assert trainer.state.global_step == STEPS
        assert len(client_ids_seen(b)) == 1  # the survivor served this run's client
    finally:
        for s in servers:
            s.close()


@pytest.mark.slow
def test_only_teacher_killed_mid_run_raises_a_clear_error_not_a_hang(
    tmp_path: Path, seed: int
) -> None:
    teacher_dir, _ = tiny_models(tmp_path)
    server = ServerProcess(teacher_dir).wait_ready()
    try:
        trainer = make_trainer(tmp_path, (server.address,), seed)
        killer = KillAfterStep(server, KILL_AFTER)
        trainer.add_callback(killer)
        with pytest.raises(TeacherError) as info:
            trainer.train()
        waited = time.monotonic() - killer.killed_at
    finally:
        server.close()
    message = str(info.value)
    assert "teacher 't'" in message and server.address in message, message
    assert f"step {KILL_AFTER}" in message, message
    assert waited < 10.0 + 30.0, waited  # the request deadline, plus slack for a busy CI
    assert trainer.state.global_step == KILL_AFTER
