"""The quick demo end to end, as CI runs it: `hybrid-distill demo --quick` in a fresh
process (no Triton interpreter: the torch path a CPU user gets), teacher pre-training,
the teacher service subprocess on loopback, the hybrid training, the results and plots.

The student's warm start is minimal (format only, chance-level reward), so the rise the
test asserts is the hybrid phase's work; a trainer whose Dense term or teacher scores were
broken would leave the reward near chance and the KL where it started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_demo_learns_and_writes_results(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "trainer.demo.run", "--quick", "--out", str(tmp_path / "out"),
           "--cache", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())

    # The table CI prints, and the files the README promises.
    assert "student accuracy after" in proc.stdout and "KL(student ‖ teacher)" in proc.stdout
    for name in ("results.md", "run/reward.png", "run/kl.png", "run/metrics.jsonl"):
        assert (out / name).stat().st_size > 0, name
    assert results["teacher_source"].startswith("service")
    assert (out / "teacher_service.log").stat().st_size > 0

    # It learned: the teacher is good; the warm start alone taught next to nothing; the
    # hybrid phase moved the student measurably towards the teacher.
    teacher, before, after = results["teacher"], results["student_before"], results["student_after"]
    assert teacher["accuracy"] >= 0.9 and teacher["reward"] >= 0.9
    assert before["reward"] <= 0.1 and before["accuracy"] <= 0.05, before
    assert after["reward"] >= before["reward"] + 0.15, (before, after)
    assert after["token_acc"] >= before["token_acc"] + 0.3, (before, after)
    assert after["kl"] <= 0.6 * before["kl"], (before, after)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").open()]
    assert rows[-1]["step"] == results["train_steps"]
