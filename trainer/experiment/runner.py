"""Runs a grid: every (task, method, seed) not yet done.

Parallel-safe and resumable: a run is skipped when its result.json exists (written
atomically at the end of the run), claimed with an O_EXCL lock file so that several
runner processes sharing one output directory never run it twice (`--jobs N` starts
N − 1 more runner processes on the same grid), and a run that raised leaves failed.json
with the traceback and is retried by the next invocation. Shared artefacts (teachers,
warm starts, prompts) are built once under their own locks (models.py). Runs execute
in the runner's process (importing torch and transformers once per process, not per
run: on the shared 2-core machine that import took over a minute under load).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from trainer.experiment.files import RESULT, try_lock, unlock, write_json
from trainer.experiment.grid import Grid, Run
from trainer.experiment.run_one import execute


@dataclass(frozen=True)
class GridStatus:
    done: int  # runs of the (selected) grid with a result, by anyone
    ran: int  # runs this process finished
    failed: list[str]
    wall_s: float


def run_grid(
    grid: Grid,
    out: Path,
    *,
    threads: int = 1,
    select: Callable[[Run], bool] | None = None,
    progress: bool = True,
    helpers: Sequence[Sequence[str]] = (),
) -> GridStatus:
    """Runs what is left of `grid` under `out` in this process; `helpers` are command
    lines of extra runner processes started first and waited for at the end."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "grid.json", {"file": str(grid.path), **dict(grid.raw)})
    procs = [subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL) for cmd in helpers]
    runs = [r for r in grid.runs() if select is None or select(r)]

    def finished() -> int:
        return sum((r.directory(out) / RESULT).is_file() for r in runs)

    bar = tqdm(total=len(runs), initial=finished(), desc="grid", unit="run", disable=not progress)
    failed: list[str] = []
    ran = 0
    try:
        for run in runs:
            rdir = run.directory(out)
            if (rdir / RESULT).is_file() or not try_lock(rdir / "lock"):
                continue
            try:
                if (rdir / RESULT).is_file():  # finished by another runner meanwhile
                    continue
                bar.set_postfix_str(run.key, refresh=True)
                try:
                    execute(grid, out, run, threads)
                except Exception:  # one run's failure must not stop the grid
                    failed.append(run.key)
                    write_json(rdir / "failed.json", {"traceback": traceback.format_exc()})
                else:
                    ran += 1
                    (rdir / "failed.json").unlink(missing_ok=True)
            finally:
                unlock(rdir / "lock")
            bar.update(finished() - bar.n)
    finally:
        for p in procs:
            p.wait()
        bar.update(finished() - bar.n)
        bar.close()
    return GridStatus(finished(), ran, failed, time.perf_counter() - t0)


def helper_commands(argv: Sequence[str], jobs: int) -> list[list[str]]:
    """`jobs − 1` copies of this command line as quiet helper runners (no report)."""
    base = [sys.executable, "-m", "trainer.experiment.cli", *argv, "--helper"]
    return [list(base) for _ in range(max(0, jobs - 1))]


def renice(nice: int) -> None:
    if nice:
        os.nice(nice)
