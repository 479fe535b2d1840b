"""The experiment grid end to end (smoke size), and its resumable, parallel-safe files."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.experiment import cli
from trainer.experiment.archive import archive, rounded
from trainer.experiment.files import try_lock, unlock, write_json
from trainer.experiment.grid import load_grid
from trainer.experiment.report import comparison, load_results, reach, smoothed, summarise

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

    # Archived (the committed form): the same runs, and a report over them that matches
    # the live one up to the archive's 6 significant digits.
    arc = tmp_path / "archive"
    assert cli.main(["archive", "--out", str(out), "--to", str(arc), "--no-plots"]) == 0
    kept = sorted(str(p.relative_to(arc)) for p in arc.glob("runs/*/*/seed*/*"))
    assert kept == [f"runs/reversal/{m}/seed0/result.json.gz" for m in ("hybrid_g0", "offline")]
    _assert_rows_match(json.loads((arc / "results.json").read_text()), rows)
    labels = [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| rev")]
    md = (arc / "results.md").read_text()
    assert [line.split(" | ")[:2] for line in md.splitlines() if line.startswith("| rev")] == labels


def _assert_rows_match(got: list[dict], want: list[dict]) -> None:
    assert [(r["task"], r["method"]) for r in got] == [(r["task"], r["method"]) for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-9, nan_ok=True), key
            else:
                assert g[key] == value, key


def test_offline_steps_train_offline_first_then_on_policy_from_that_student(
    tmp_path: Path,
) -> None:
    import torch
    from safetensors.torch import load_file

    steps, n_off = 8, random.randrange(2, 6)
    grid = tmp_path / "warm.yaml"
    grid.write_text(
        f"base: {BASE}\nsteps: {steps}\nseeds: [0]\ntasks: [reversal]\neval_prompts: 16\n"
        "warm_steps: 3\ntrain_prompts: 50\nteacher_steps: 8\n"
        "methods:\n  hybrid_g0: {sparse.lam: 2.0, rollout.prompts_per_step: 2, "
        "rollout.group_size: 2}\n"
        f"  warm: {{from: hybrid_g0, offline_steps: {n_off}}}\n"
    )
    out = tmp_path / "out"
    argv = ["run", "--grid", str(grid), "--out", str(out), "--only", "reversal/warm/"]
    assert cli.main(argv) == 0
    run = out / "runs/reversal/warm/seed0"
    rec = json.loads((run / "result.json").read_text())
    hist = rec["history"]
    assert rec["offline_steps"] == n_off and len(hist) == steps
    assert [h["step"] for h in hist] == list(range(1, steps + 1))
    # The offline rows carry no λ (the on-policy loop logs it); every row counts teacher tokens.
    assert ["lam" in h for h in hist] == [False] * n_off + [True] * (steps - n_off)
    assert all(h["teacher_tokens"] > 0 for h in hist)
    # The on-policy phase trained the offline phase's student, not the grid's warm start.
    assert rec["config"]["student"]["model_dir"] == str(run / "offline_student")
    assert rec["config"]["run"]["steps"] == steps - n_off
    # Each phase logged its steps as it went, into its own metrics.jsonl.
    offline_log = [json.loads(x) for x in (run / "offline/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in offline_log] == list(range(1, n_off + 1))
    assert [r["reward"] for r in offline_log] == [h["reward"] for h in hist[:n_off]]
    train_log = (run / "train/metrics.jsonl").read_text().splitlines()
    assert len(train_log) == steps - n_off
    assert rec["warm_steps"] == 3 and rec["grid"] == str(grid)
    init = load_file(out / "shared/students/reversal-seed0/model.safetensors")
    warm = load_file(run / "offline_student" / "model.safetensors")
    assert any(not torch.equal(init[k], warm[k]) for k in init)
    row = json.loads((out / "results.json").read_text())[0]
    assert row["role"] == "hybrid" and json.loads(row["overrides"])["offline_steps"] == n_off


def test_offline_overrides_apply_to_the_offline_phase_only(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    n_off = random.randrange(2, 5)
    grid = tmp_path / "phase.yaml"
    grid.write_text(
        f"base: {BASE}\nsteps: 6\nseeds: [0]\ntasks: [reversal]\neval_prompts: 16\n"
        "warm_steps: 3\ntrain_prompts: 50\nteacher_steps: 8\n"
        f"methods:\n  warm: {{sparse.lam: 2.0, offline_steps: {n_off}, rollout.group_size: 2, "
        "rollout.prompts_per_step: 2, offline: {optim.lr: 0.0, rollout.group_size: 1}}\n"
    )
    out = tmp_path / "out"
    assert cli.main(["run", "--grid", str(grid), "--out", str(out)]) == 0
    run = out / "runs/reversal/warm/seed0"
    rec = json.loads((run / "result.json").read_text())
    assert rec["offline_overrides"] == {"optim.lr": 0.0, "rollout.group_size": 1}
    # lr 0 in the offline phase: its student is the warm start, weight for weight ...
    init = load_file(out / "shared/students/reversal-seed0/model.safetensors")
    warm = load_file(run / "offline_student" / "model.safetensors")
    assert all(torch.equal(init[k], warm[k]) for k in init)
    # ... and the on-policy phase kept the method's own lr and group size.
    assert rec["config"]["optim"]["lr"] == 3.0e-3 and rec["config"]["rollout"]["group_size"] == 2
    row = json.loads((out / "results.json").read_text())[0]
    assert json.loads(row["overrides"])["offline"] == rec["offline_overrides"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{offline_steps: -1}", "methods.a.offline_steps must be an integer >= 0, got -1"),
        ("{offline_steps: 2.5}", "methods.a.offline_steps must be an integer >= 0, got 2.5"),
        ("{kind: offline, offline_steps: 2}", "offline_steps needs an on-policy method"),
        ("{offline_steps: 5}", "offline_steps (5) must be below steps (5)"),
        ("{offline: {optim.lr: 0.1}}", "methods.a.offline sets the offline phase's overrides"),
        ("{offline_steps: 2, offline: 3}", "methods.a.offline must be a mapping"),
        ("{offline_steps: 2, offline: {optim.lrr: 1}}", "method a: offline phase: "),
    ],
)
def test_offline_steps_errors_name_the_method_and_bound(
    tmp_path: Path, spec: str, message: str
) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text(f"base: {BASE}\nsteps: 5\ntasks: [reversal]\nmethods: {{a: {spec}}}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_grid(bad)


@pytest.mark.parametrize(
    "path", sorted(p for p in BASE.parent.glob("*.yaml") if p != BASE), ids=lambda p: p.name
)
def test_shipped_grids_load(path: Path) -> None:
    """Every grid under configs/experiments/ parses, with every method's overrides valid."""
    grid = load_grid(path)
    assert grid.runs() and grid.base == BASE


def test_grid_student_size_builds_that_student_and_refuses_a_cached_other(
    tmp_path: Path,
) -> None:
    heads = random.choice([1, 2, 4])
    hidden = heads * random.choice([8, 16])
    grid = tmp_path / "small.yaml"
    body = (
        f"base: {BASE}\nsteps: 2\nseeds: [0]\ntasks: [reversal]\neval_prompts: 8\n"
        "warm_steps: 2\ntrain_prompts: 20\nteacher_steps: 4\n"
        "methods:\n  opd: {sparse.lam: 0.0, rollout.prompts_per_step: 2, rollout.group_size: 2}\n"
    )
    grid.write_text(body + f"student: {{hidden: {hidden}, layers: 1, heads: {heads}}}\n")
    out = tmp_path / "out"
    assert cli.main(["run", "--grid", str(grid), "--out", str(out)]) == 0
    cfg = json.loads((out / "shared/students/reversal-seed0/config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (
        hidden, 1, heads)  # fmt: skip
    rec = json.loads((out / "runs/reversal/opd/seed0/result.json").read_text())
    assert rec["student"] == {"hidden": hidden, "layers": 1, "heads": heads, "max_positions": 64}

    # The same --out with another student size: refused, naming both, before training.
    grid.write_text(body)  # the default size
    (out / "runs/reversal/opd/seed0/result.json").unlink()
    assert cli.main(["run", "--grid", str(grid), "--out", str(out)]) == 1
    failed = (out / "runs/reversal/opd/seed0/failed.json").read_text()
    assert "holds a student built as" in failed and "use another --out" in failed


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ("{hidden: 64, layers: 2}", "student must be a mapping with exactly the keys"),
        ("{hidden: 64, layers: 0, heads: 2}", "student.layers must be an integer >= 1, got 0"),
        ("{hidden: 64, layers: 2, heads: 2.0}", "student.heads must be an integer >= 1"),
        ("{hidden: 60, layers: 2, heads: 8}", "student.hidden (60) must be a multiple of"),
    ],
)
def test_grid_student_errors_name_the_field(tmp_path: Path, student: str, message: str) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text(f"base: {BASE}\ntasks: [reversal]\nmethods: {{a: {{}}}}\nstudent: {student}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_grid(bad)


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


def test_archive_rounds_gzips_and_a_live_result_wins(tmp_path: Path) -> None:
    rng = random.Random()
    out, arc = tmp_path / "out", tmp_path / "arc"
    records = {m: _record(m, rng.randrange(30, 60), None, rng.random()) for m in ("a", "b")}
    for rec in records.values():
        rec["history"][-1]["reward"] = rng.random()  # a float with all 17 digits
        write_json(out / f"runs/t/{rec['method']}/seed0/result.json", rec)
    assert len(archive(out, arc)) == 2
    for m, rec in records.items():
        path = arc / f"runs/t/{m}/seed0/result.json.gz"
        kept = json.loads(gzip.decompress(path.read_bytes()))
        assert kept == rounded(rec) and kept["history"][-1]["reward"] == float(
            f"{rec['history'][-1]['reward']:.6g}"
        )
    first = (arc / "runs/t/a/seed0/result.json.gz").read_bytes()
    archive(out, arc)  # unchanged runs archive to the same bytes: nothing to commit
    assert (arc / "runs/t/a/seed0/result.json.gz").read_bytes() == first
    # An archive holding a live result.json too reports the live one, once.
    live = dict(records["a"], final={"reward": 0.5, "accuracy": 0.5, "kl": 0.0})
    write_json(arc / "runs/t/a/seed0/result.json", live)
    loaded = {r["method"]: r for r in load_results(arc)}
    assert len(load_results(arc)) == 2 and loaded["a"]["final"]["reward"] == 0.5
    with pytest.raises(FileNotFoundError, match="no finished run"):
        archive(tmp_path / "empty", arc)


def _record(method: str, steps: int, reach_at: int | None, final: float, **config) -> dict:
    """A run record whose reward jumps from 0 to 1 at `reach_at` (never when None)."""
    hist = [{"step": i + 1, "reward": float(reach_at is not None and i + 1 >= reach_at),
             "teacher_tokens": 1.0} for i in range(steps)]  # fmt: skip
    base = {"dense": {"kl_coef": 1.0}, "sparse": {"lam": {"start": 2.0, "end": None}}}
    for key, value in config.items():
        base[key] = value
    return {"task": "t", "method": method, "kind": "offline" if method == "offline" else "onpolicy",
            "seed": 0, "overrides": {}, "steps": steps, "teacher": {"reward": 1.0},
            "final": {"reward": final, "accuracy": final, "kl": 0.0}, "history": hist,
            "wall_s": 1.0, "config": base}  # fmt: skip


@pytest.mark.parametrize("pure_rl_reaches", [False, True])
def test_comparison_answers_the_issue_question_per_hybrid(pure_rl_reaches: bool) -> None:
    rng = random.Random()
    n = rng.randrange(200, 400)
    fast, slow = rng.randrange(20, n // 5 - 10), rng.randrange(n // 5 + 30, n - 20)
    # A full window after the jump must fit in the run, or pure RL never "reaches".
    rl_at = rng.randrange(slow + 10, n - 10) if pure_rl_reaches else None
    off_final = rng.uniform(0.3, 0.7)
    records = [
        _record("pure_rl", n, rl_at, 0.1, dense={"kl_coef": 0.0}),
        # A shorter pure RL run that never got there: the comparison uses the longest.
        _record("pure_rl_short", n // 2, None, 0.1, dense={"kl_coef": 0.0}),
        _record("opd", n, slow, 0.9, sparse={"lam": {"start": 0.0, "end": None}}),
        _record("offline", n, slow, off_final),
        _record("fast", n, fast, off_final + 0.05),
        _record("slow", n, slow, off_final - 0.05),
        _record("never", n, None, 0.0),
    ]
    rows = summarise(records)
    assert {r["method"]: r["role"] for r in rows} == {
        "pure_rl": "pure_rl", "pure_rl_short": "pure_rl", "opd": "opd", "offline": "offline",
        "fast": "hybrid", "slow": "hybrid", "never": "hybrid",
    }  # fmt: skip
    table = {line.split(" | ")[1]: line for line in comparison(rows).splitlines()[2:]}
    assert set(table) == {"fast", "slow", "never"}  # opd and the baselines are not hybrids
    denominator = rl_at + 10 - 1 if pure_rl_reaches else n  # a full window after the jump
    fast_ratio = (fast + 10 - 1) / denominator
    fast_verdict = "yes" if fast_ratio <= 0.2 else "no"  # always "yes" for a bound h / n
    assert f"{fast_ratio:.2f}" in table["fast"] and f"| {fast_verdict} | +0.050" in table["fast"]
    slow_verdict = "no" if pure_rl_reaches else "unknown"
    assert f"| {slow_verdict} | -0.050" in table["slow"] and table["slow"].endswith("| no |")
    assert "not reached (0/1 seeds) | no |" in table["never"]


def test_comparison_holds_hybrids_to_the_best_offline_variant() -> None:
    rng = random.Random()
    n = rng.randrange(100, 200)
    lo, hi = sorted(rng.uniform(0.2, 0.8) for _ in range(2))
    hyb = (lo + hi) / 2  # above one offline variant, below the other
    records = [
        _record("pure_rl", n, None, 0.0, dense={"kl_coef": 0.0}),
        _record("offline_a", n, None, hi),
        _record("offline", n, None, lo),
        _record("hyb", n, n // 10, hyb),
    ]
    records[1]["kind"] = "offline"
    line = comparison(summarise(records)).splitlines()[2]
    assert f"| {hyb - hi:+.3f} ± 0.000 (vs offline_a) | no |" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--threads", "-2"], "--threads must be >= 1, got -2"),
        (["--grid", "missing.yaml"], "--grid: no such file: missing.yaml"),
        (["--only", "nowhere/"], "--only nowhere/ matches none of the grid's 2 runs"),
        (["--typo"], "method hybrid_g0: config.sparse: unknown keys ['lamb']"),
    ],
)
def test_bad_run_arguments_fail_before_any_run_naming_what_is_wrong(
    tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _smoke_grid(tmp_path)
    if argv == ["--typo"]:
        grid.write_text(grid.read_text().replace("sparse.lam:", "sparse.lamb:"))
        argv = []
    with pytest.raises(SystemExit):
        cli.main(["run", "--grid", str(grid), "--out", str(tmp_path / "out"), *argv])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was built or run


def test_archive_of_an_out_without_finished_runs_fails_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out" / "runs" / "t" / "m" / "seed0").mkdir(parents=True)  # started, unfinished
    with pytest.raises(SystemExit):
        cli.main(["archive", "--out", str(tmp_path / "out"), "--to", str(tmp_path / "arc")])
    assert f"--out {tmp_path / 'out'}: no finished run" in capsys.readouterr().err
    assert not (tmp_path / "arc").exists()


@pytest.mark.parametrize(
    "archived",
    sorted(p.parent for p in (BASE.parents[2] / "results").glob("*/results.json")),
    ids=lambda p: p.name,
)
def test_committed_archives_back_their_tables_and_the_docs(archived: Path) -> None:
    """Every committed archive (results/<grid>/) still produces the table committed beside
    it, and docs/results.md quotes that table: no documented row without its runs."""
    rows = summarise(load_results(archived))
    assert rows, f"{archived}: no archived runs"
    _assert_rows_match(rows, json.loads((archived / "results.json").read_text()))
    docs = (BASE.parents[2] / "docs" / "results.md").read_text()
    table = [line for line in (archived / "results.md").read_text().splitlines() if line]
    missing = [line for line in table if line not in docs]
    assert not missing, f"docs/results.md lacks these rows of {archived}/results.md: {missing}"
