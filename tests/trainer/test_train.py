"""The training loop against a real teacher service on loopback: the service path gives
the same teacher numbers as the in-process teacher, the loop trains through it, logs every
metric, and serves the Prometheus gauges the deploy dashboard reads."""

from __future__ import annotations

import dataclasses
import json
import random
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from teacher_service.config import ModelSpec, ServerConfig
from teacher_service.server import serve_in_thread
from tests.trainer.test_train_fixtures import VOCAB, tiny_config, tiny_models
from trainer.config import TeacherSpec
from trainer.metrics import GAUGES
from trainer.rollout import sample
from trainer.schedules import LambdaSchedule
from trainer.teacher_source import LocalTeacher, ServiceTeacher, check_handshake
from trainer.train import train

METRIC_KEYS = {
    "loss", "dense_kl", "sparse_surrogate", "objective", "kl", "kl_sampled", "reward",
    "reward/token_accuracy", "reward/exact_match", "lam", "gamma", "student_mass", "tail",
    "teacher_wait_frac", "tokens_per_s", "step_time_s", "lr", "grad_norm", "response_len",
}  # fmt: skip


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("svc")
    teacher, _ = tiny_models(root)
    cfg = ServerConfig(models=(ModelSpec("tiny", teacher),), host="127.0.0.1", grpc_port=0,
                       http_port=0, torch_threads=1, grace_seconds=0.0)  # fmt: skip
    server = serve_in_thread(cfg)
    yield root, server
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_and_in_process_teacher_agree(service, seed: int) -> None:
    root, server = service
    teacher_dir, student_dir = tiny_models(root)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(5, 40) for _ in range(rng.randrange(2, 6))] for _ in range(3)]
    ro = sample(student, prompts, [{}] * 3, group_size=2, temperature=1.0, max_new_tokens=6,
                stop_ids=(2,), keep_topk=8, pad_id=0,
                generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batch = ro.layout(pad_id=0)
    local = LocalTeacher(TeacherSpec(name="l", model_dir=str(teacher_dir)), torch.device("cpu"))
    remote = ServiceTeacher(TeacherSpec(name="r", endpoints=(server.address,)), "test")
    remote.connect(local.vocab_size, local.fingerprint)
    try:
        k = rng.randrange(1, 17)
        a = local.submit(batch, k, batch.student_topk, full=False).result()
        b = remote.submit(batch, k, batch.student_topk, full=False).result()
    finally:
        local.close()
        remote.close()
    m = batch.mask.bool()
    torch.testing.assert_close(a.token_logprobs[m], b.token_logprobs[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.topk_logprobs[m], b.topk_logprobs[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.query_logprobs[m], b.query_logprobs[m], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.leftover_logmass[m], b.leftover_logmass[m], atol=1e-3, rtol=1e-3)
    # Ids may swap only between (numerically) tied log-probs.
    same = a.topk_ids[m] == b.topk_ids[m]
    assert bool(same.float().mean() > 0.95)


def test_handshake_mismatch_names_what_differs() -> None:
    with pytest.raises(RuntimeError, match="vocab size 300 differs from the student's 256"):
        check_handshake("t", 300, "a" * 64, VOCAB, "a" * 64)
    with pytest.raises(RuntimeError, match="tokenizer fingerprint"):
        check_handshake("t", VOCAB, "a" * 64, VOCAB, "b" * 64)


def test_loop_trains_against_the_service_and_reports(service, tmp_path: Path) -> None:
    root, server = service
    port = _free_port()
    svc = TeacherSpec(name="svc", endpoints=(server.address,))
    config = tiny_config(root, tmp_path / "run", teachers=(svc,))
    config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, steps=4, metrics_port=port, plots=True)
    )
    result = train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert row.keys() >= METRIC_KEYS, METRIC_KEYS - row.keys()
        assert 0.0 <= row["teacher_wait_frac"] <= 1.0
        assert 0.0 < row["student_mass"] <= 1.0 + 1e-6 and row["tail"] >= 0.0
        assert row["tokens_per_s"] > 0
    assert rows[0]["lam"] == pytest.approx(0.1) and rows[-1]["lam"] > rows[0]["lam"]
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0
    assert (tmp_path / "run" / "kl.png").stat().st_size > 0
    assert result.history[-1]["loss"] == rows[-1]["loss"]

    # The Prometheus gauges, with exactly the names the deploy dashboard queries.
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    for name in GAUGES:
        assert name in values, name
    assert values["trainer_step"] == 4
    assert values["trainer_reward_mean"] == pytest.approx(rows[-1]["reward"])
    assert values["trainer_kl_mean"] == pytest.approx(rows[-1]["kl"])


@pytest.mark.parametrize("support", ["full", "union"])
def test_two_half_weight_copies_of_a_teacher_equal_one_teacher(
    tmp_path: Path, support: str
) -> None:
    """Σ_m w_m KL(π ‖ q_m) with q_1 = q_2 and w = (½, ½) is KL(π ‖ q): the multi-teacher
    path (weights in the Dense kernel, the costs and the returns) must agree exactly."""
    teacher, _ = tiny_models(tmp_path)
    one = (TeacherSpec(name="a", model_dir=str(teacher)),)
    two = tuple(TeacherSpec(name=n, weight=0.5, model_dir=str(teacher)) for n in "ab")
    runs = []
    for name, teachers in (("one", one), ("two", two)):
        config = tiny_config(tmp_path, tmp_path / name, teachers=teachers, support=support)
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, steps=2))
        runs.append(train(config).history)
    for key in ("loss", "dense_kl", "kl", "kl_sampled", "objective", "grad_norm"):
        for a, b in zip(runs[0], runs[1], strict=True):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_gamma_schedule_switches_the_future_costs_on_at_its_step(tmp_path: Path) -> None:
    """γ = 0 for step 0, 1 from step 1: step 0 is the γ = 0 run's step exactly; at step 1
    (same parameters, same samples) only the returns differ, by the future costs."""
    runs = {}
    for name, gamma in (("g0", LambdaSchedule()), ("switch", LambdaSchedule("step", 0.0, 1.0, 1))):
        config = tiny_config(tmp_path, tmp_path / name)
        sparse = dataclasses.replace(config.sparse, gamma=gamma)
        config = dataclasses.replace(
            config, sparse=sparse, run=dataclasses.replace(config.run, steps=2)
        )
        runs[name] = train(config).history
    g0, switch = runs["g0"], runs["switch"]
    assert [r["gamma"] for r in g0] == [0.0, 0.0] and [r["gamma"] for r in switch] == [0.0, 1.0]
    assert g0[0] | {"step_time_s": 0, "tokens_per_s": 0, "teacher_wait_frac": 0} == switch[0] | {
        "step_time_s": 0,
        "tokens_per_s": 0,
        "teacher_wait_frac": 0,
    }
    assert switch[1]["kl_sampled"] == pytest.approx(g0[1]["kl_sampled"], rel=1e-6)
    assert abs(switch[1]["return_mean"] - g0[1]["return_mean"]) > 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loop_runs_on_cuda_with_bf16_autocast(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, tmp_path / "gpu")
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, device="cuda"))
    rows = train(config).history
    assert len(rows) == config.run.steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
