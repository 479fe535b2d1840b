"""benchmarks/gpu_suite.sh keeps working without a GPU: its --dry-run runs every step at
tiny sizes on the CPU and writes the JSON and Markdown summary; a failing step is recorded
and does not stop the suite."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "tests_ops", "tests_gpu", "dense_kl", "fused_lm_head", "service", "vllm"]


def _suite(out: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--dry-run", str(out)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_dry_run_writes_every_step(tmp_path):
    """Every step runs (or is skipped with a reason when its script or environment is
    absent) and succeeds; the figures of each benchmark land in summary.json/.md."""
    run = _suite(tmp_path, 2300)
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == STEPS, run.stdout
    bad = {n: s["status"] for n, s in steps.items() if s["status"] not in ("ok", "skipped")}
    assert not bad and run.returncode == 0, (bad, (tmp_path / "summary.md").read_text())
    assert summary["dry_run"] is True and summary["env"]["device"]

    ops = steps["tests_ops"]["figures"]  # JUnit counts: GPU tests collected, all skipped
    assert ops["tests"] > 0 and ops["skipped"] == ops["tests"]
    dense = steps["dense_kl"]["figures"]
    methods = {(r["section"], r["method"]) for r in dense["rows"]}
    assert ("full vocab", "triton kernel") in methods  # the kernels ran (interpreter)
    assert ("top-K", "triton support_grad [N, K]") in methods
    assert dense["tiny"] and dense["goals"]["evaluated"] is False  # no GPU: no goal claims
    service = steps["service"]["figures"]
    assert [r["clients"] for r in service["rows"]] == [2] and service["rows"][0]["errors"] == 0
    if steps["fused_lm_head"]["status"] == "ok":
        assert steps["fused_lm_head"]["figures"] is not None

    md = (tmp_path / "summary.md").read_text()
    assert "dry run" in md and "| dense_kl | ok |" in md
    assert "| full vocab | triton kernel |" in md  # the benchmark's rows as a table
    for name in STEPS:
        assert (tmp_path / "logs" / f"{name}.log").is_file()


def test_a_failing_step_is_recorded_and_the_suite_goes_on(tmp_path):
    """dense_kl given 1 s times out; it is recorded as such, the steps after it still run,
    the summary is written and the exit status says something failed."""
    run = _suite(tmp_path, 300, SUITE_STEPS="dense_kl,env", SUITE_T_DENSE_KL="1")
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == ["env", "dense_kl"]  # SUITE_STEPS selects; suite order is kept
    assert steps["dense_kl"]["status"] == "timeout" and steps["dense_kl"]["timeout_s"] == 1
    assert steps["env"]["status"] == "ok"
    assert run.returncode == 1 and summary["ok"] is False
    assert "| dense_kl | timeout |" in (tmp_path / "summary.md").read_text()
