"""`accelerate launch --num_processes 2` (torchrun, gloo on CPU) runs the TRL example
(examples/trl_hybrid_distill.py with examples/trl_demo.yaml) on the demo task against a
real teacher service process: it trains to completion, the service sees one client id
per rank, and the reward rises.

The student is the training-loop tests' tiny random Llama; the reward is a format reward
on the demo task's prompts (tests/trainer/trl_fixtures.py: symbol_fraction), which a few
RL steps raise from its chance level, so that a CI run of a few seconds of training shows
learning. The Dense weight is small (the teacher is random, so its KL would hold the
format at chance); the test is about the integration training, not about the teacher.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from tests.trainer.client_fixtures import ServerProcess
from tests.trainer.test_train_fixtures import tiny_models
from tests.trainer.trl_fixtures import SPEC, client_ids_seen

ROOT = Path(__file__).resolve().parents[2]
STEPS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_run_trains_on_the_demo_task(tmp_path: Path) -> None:
    teacher_dir, student_dir = tiny_models(tmp_path)
    server = ServerProcess(teacher_dir).wait_ready()
    out = tmp_path / "out"
    task = f"{{vocab_size: {SPEC.vocab_size}, length: {SPEC.length}, alphabet: {SPEC.alphabet}, prompts: 512, seed: 4}}"  # noqa: E501
    sets = [
        f"grpo.output_dir={out}", f"grpo.max_steps={STEPS}", "grpo.use_cpu=true",
        f"task={task}",
        "rewards=[{fn: 'tests.trainer.trl_fixtures:symbol_fraction', weight: 1.0}]",
        "grpo.per_device_train_batch_size=32", "grpo.max_completion_length=4",
        "grpo.learning_rate=0.03", "grpo.warmup_steps=0", "grpo.lr_scheduler_type=constant",
        "sparse.lam={kind: constant, start: 4.0}", "dense.k=8", "dense.kl_coef=0.1",
    ]  # fmt: skip
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA, with
    # grpo.use_cpu, each process joins a gloo group (accelerate's MULTI_CPU).
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
        "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(ROOT / "examples" / "trl_hybrid_distill.py"),
        "--config", str(ROOT / "examples" / "trl_demo.yaml"),
        "--teacher", server.address, "--student", str(student_dir),
        *[arg for s in sets for arg in ("--set", s)],
    ]  # fmt: skip
    # No Triton interpreter in the children: the torch path a CPU user gets.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
        assert proc.returncode == 0, proc.stderr[-4000:]
        clients = client_ids_seen(server)
    finally:
        server.close()

    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # rank 0 only, every step
    assert len(clients) == 2 and {c.rsplit("-", 1)[-1] for c in clients} == {"rank0", "rank1"}
    reward = [r["reward"] for r in rows]
    first, last = sum(reward[:4]) / 4, sum(reward[-4:]) / 4
    assert last >= first + 0.2, reward
    assert all(0.0 <= r["student_mass"] <= 1.0 and r["kl"] >= 0.0 for r in rows)
    assert all(0.0 <= r["teacher_wait_frac"] <= 1.0 for r in rows)
