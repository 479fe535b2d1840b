"""A grid's finished runs, small enough to commit: `hybrid-distill experiment archive`.

`runs/` is not versioned (checkpoints, teachers, logs: hundreds of MB), so a fresh
checkout has no run behind the tables in docs/results.md, and a later session cannot add
seeds to a grid it no longer has. The archive keeps what the report reads and nothing
else: each run's result.json (its config, per-step history, final evaluation) with every
float rounded to 6 significant digits and gzipped, at the same relative path
(`runs/<task>/<method>/seed<k>/result.json.gz`); a record names its grid file, method
overrides, steps and student, so the archive needs nothing beside it. The report reads
archives like live outputs (report.load_results), so

    hybrid-distill experiment archive --out runs/experiments/goal --to results/goal

writes the archive and then its results.{csv,json,md} and plots beside it. Archiving
several --out into one --to merges them (one report over every grid, as one shared --out
would). Rounding changes no printed figure (the tables print ≤ 3 decimals); a step to
95 % could move only if a trailing mean lay within 1e-6 (relative) of the target. gzip's
mtime is fixed, so an unchanged run archives to the same bytes (no diff to commit).
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

from trainer.experiment.files import ARCHIVED, RESULT

DIGITS = 6


def rounded(value: Any, digits: int = DIGITS) -> Any:
    """`value` with every finite float rounded to `digits` significant digits (dicts and
    lists recursively; ints, strings, NaN and inf unchanged)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{digits}g}")
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def archive(out: Path, to: Path) -> list[Path]:
    """Writes every finished run of `out` into the archive `to`; returns the paths written.

    Raises FileNotFoundError when `out` holds no finished run (nothing to keep)."""
    results = sorted((out / "runs").glob(f"*/*/seed*/{RESULT}"))
    if not results:
        raise FileNotFoundError(f"--out {out}: no finished run (no runs/*/*/seed*/{RESULT})")
    written = []
    for path in results:
        record = rounded(json.loads(path.read_text()))
        data = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        dest = to / path.relative_to(out).with_name(ARCHIVED)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.write_bytes(gzip.compress(data, mtime=0))
        tmp.replace(dest)
        written.append(dest)
    return written


def read_result(path: Path) -> dict[str, Any]:
    """A run record from result.json or its archived result.json.gz."""
    if path.name == ARCHIVED:
        return json.loads(gzip.decompress(path.read_bytes()))
    return json.loads(path.read_text())
