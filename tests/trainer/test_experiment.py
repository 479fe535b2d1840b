"""The experiment grid end to end (smoke size), and its resumable, parallel-safe files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.experiment import cli
from trainer.experiment.files import try_lock, unlock, write_json
from trainer.experiment.grid import load_grid
from trainer.experiment.report import reach, smoothed

BASE = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "base.yaml"


def _smoke_grid(tmp_path: Path) -> Path:
    """One task, two methods (on-policy hybrid and offline), one seed, 16 steps of 2 prompts
    × 2 samples, a teacher trained for 12 steps (it need not be good: this checks the
    plumbing; the real grid is configs/experiments/grid.yaml)."""
    path = tmp_path / "smoke.yaml"
    path.write_text(
        f"base: {BASE}\nsteps: 16\nseeds: [0]\ntasks: [reversal]\neval_prompts: 32\n"
        "warm_steps: 5\ntrain_prompts: 100\nteacher_steps: 12\n"
        "methods:\n  hybrid_g0: {sparse.lam: 2.0, rollout.prompts_per_step: 2, "
        "rollout.group_size: 2}\n"
        "  offline: {kind: offline, rollout.prompts_per_step: 2, rollout.group_size: 2}\n"
    )
    return path


def test_smoke_grid_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    grid, out = _smoke_grid(tmp_path), tmp_path / "out"
    status = cli.main(["run", "--grid", str(grid), "--out", str(out)])
    failures = [p.read_text() for p in out.glob("runs/*/*/seed*/failed.json")]
    assert status == 0, failures
    rows = json.loads((out / "results.json").read_text())
    assert {(r["task"], r["method"]) for r in rows} == {("reversal", "hybrid_g0"),
                                                        ("reversal", "offline")}  # fmt: skip
    for r in rows:
        assert r["seeds"] == 1 and r["steps"] == 16
        assert 0.0 <= r["final_reward"] <= 1.0 and r["final_kl"] >= 0.0
        assert r["teacher_tokens_total"] > 0
    table = (out / "results.md").read_text()
    assert "| reversal | hybrid_g0 | 1 |" in table and "| reversal | offline | 1 |" in table
    with (out / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    for x in ("step", "tokens"):
        assert (out / "plots" / f"reversal_reward_vs_{x}.png").stat().st_size > 0
    rec = json.loads((out / "runs/reversal/hybrid_g0/seed0/result.json").read_text())
    assert len(rec["history"]) == 16 and rec["config"]["sparse"]["lam"]["start"] == 2.0

    # Resumable: a second invocation finds everything done and runs nothing.
    stamp = (out / "runs/reversal/offline/seed0/result.json").stat().st_mtime_ns
    status = cli.main(["run", "--grid", str(grid), "--out", str(out)])
    assert status == 0
    assert (out / "runs/reversal/offline/seed0/result.json").stat().st_mtime_ns == stamp


def test_locks_are_exclusive_and_stale_ones_are_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / "run" / "lock"
    assert try_lock(lock)
    assert not try_lock(lock)  # held by this (live) process
    unlock(lock)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    write_json(lock, {"pid": int(dead.stdout), "host": os.uname().nodename, "t": 0})
    assert try_lock(lock)  # its owner exited: stale
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_reach_uses_a_full_window_of_the_smoothed_reward() -> None:
    rewards = [0.0] * 5 + [1.0] * 30
    hist = [{"step": i + 1, "reward": r, "teacher_tokens": 10.0} for i, r in enumerate(rewards)]
    rec = {"history": hist, "teacher": {"reward": 1.0}}
    step, tokens = reach(rec)
    sm = smoothed(rewards)
    first = next(i for i, v in enumerate(sm) if v >= 0.95) + 1
    assert step == first and tokens == 10.0 * first
    assert reach({**rec, "teacher": {"reward": 2.0}}) == (None, None)


def test_grid_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text(f"base: {BASE}\ntasks: [reversal]\nmethods: {{a: {{}}}}\nstepz: 3\n")
    with pytest.raises(ValueError, match="stepz"):
        load_grid(bad)
    bad.write_text(f"base: {BASE}\ntasks: [nope]\nmethods: {{a: {{}}}}\n")
    with pytest.raises(ValueError, match="nope"):
        load_grid(bad)
    bad.write_text(f"base: {BASE}\ntasks: [reversal]\nmethods: {{a: {{from: zz}}}}\n")
    with pytest.raises(ValueError, match="zz"):
        load_grid(bad)
