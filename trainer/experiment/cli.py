"""`hybrid-distill experiment`: run the grid, then write its table and plots.

    hybrid-distill experiment run --grid configs/experiments/grid.yaml \\
        --out runs/experiments/grid [--jobs 1] [--threads 1] [--nice 15] [--only TASK/METHOD]
    hybrid-distill experiment report --out runs/experiments/grid
    hybrid-distill experiment archive --out runs/experiments/grid --to results/grid

`run` is resumable (finished runs are skipped, failed ones retried) and parallel-safe
(several `run` processes may share one --out), and writes the report when it ends.
`archive` keeps the finished runs' records, small enough to commit (archive.py), and
writes the report over the archive; `report --out` reads an archive like a live --out.
Runs use the in-process teacher (trainer/teacher_source.py), not the gRPC service: the
same top-K rows without a server process competing for the CPU (docs/results.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from trainer.experiment.archive import archive
from trainer.experiment.grid import load_grid
from trainer.experiment.report import write_report
from trainer.experiment.runner import helper_commands, renice, run_grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hybrid-distill experiment", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid, then report")
    run.add_argument("--grid", type=Path, default=Path("configs/experiments/grid.yaml"))
    run.add_argument("--out", type=Path, default=Path("runs/experiments/grid"))
    run.add_argument("--jobs", type=int, default=1, help="runner processes (runs at a time)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per run")
    run.add_argument("--nice", type=int, default=0, help="niceness added to the runners")
    run.add_argument("--helper", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--only", action="append", default=[],
        help="only runs whose key starts with this (reversal/, trace/opd/)")  # fmt: skip
    rep = sub.add_parser("report", help="write results.{csv,json,md} and plots")
    rep.add_argument("--out", type=Path, default=Path("runs/experiments/grid"))
    rep.add_argument("--no-plots", action="store_true")
    arc = sub.add_parser("archive", help="keep finished runs small enough to commit, report")
    arc.add_argument("--out", type=Path, required=True, help="a grid's --out")
    arc.add_argument("--to", type=Path, required=True, help="the archive (merged into)")
    arc.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "archive":
        try:
            written = archive(args.out, args.to)
        except FileNotFoundError as exc:
            parser.error(str(exc))
        size = sum(p.stat().st_size for p in written)
        rows = write_report(args.to, with_plots=not args.no_plots)
        print(f"archived {len(written)} runs ({size / 1e6:.2f} MB) into {args.to}; "
              f"its report ({len(rows)} rows): {args.to / 'results.md'}")  # fmt: skip
        return 0
    if args.command == "report":
        rows = write_report(args.out, with_plots=not args.no_plots)
        print((args.out / "results.md").read_text() if rows else "no finished runs")
        return 0
    for flag, value in (("--jobs", args.jobs), ("--threads", args.threads)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    if not args.grid.is_file():
        parser.error(f"--grid: no such file: {args.grid}")
    try:
        grid = load_grid(args.grid)
    except (ValueError, yaml.YAMLError) as exc:
        parser.error(f"--grid {args.grid}: {exc}")
    only = tuple(args.only)
    if only and not any(r.key.startswith(only) for r in grid.runs()):
        keys = [r.key for r in grid.runs()]
        parser.error(f"--only {' '.join(only)} matches none of the grid's {len(keys)} runs "
                     f"(keys look like {keys[0]!r})")  # fmt: skip
    renice(args.nice)  # before anything heavy; helpers inherit it
    helpers = [] if args.helper else helper_commands(_run_argv(args), args.jobs)
    status = run_grid(
        grid, args.out, threads=args.threads, progress=not args.helper, helpers=helpers,
        select=(lambda r: r.key.startswith(only)) if only else None,
    )  # fmt: skip
    if args.helper:
        return 0
    write_report(args.out)
    print(f"grid {args.grid}: {status.done} runs done ({status.ran} by this process), "
          f"{len(status.failed)} failed {status.failed}, {status.wall_s:.0f} s; "
          f"table: {args.out / 'results.md'}")  # fmt: skip
    return 1 if status.failed else 0


def _run_argv(args: argparse.Namespace) -> list[str]:
    argv = ["run", "--grid", str(args.grid), "--out", str(args.out), "--threads", str(args.threads)]
    for o in args.only:
        argv += ["--only", o]
    return argv


if __name__ == "__main__":
    raise SystemExit(main())
