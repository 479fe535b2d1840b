"""The `hybrid-distill` command: one entry point, one subcommand per job.

    hybrid-distill demo [--quick]          the end-to-end CPU demo (teacher, service, student)
    hybrid-distill serve --model DIR ...   the teacher service (gRPC + HTTP side port)
    hybrid-distill train --config F ...    a trainer process against a teacher service
    hybrid-distill bench NAME [args]       a benchmark script from benchmarks/
    hybrid-distill experiment run|report   the methods × tasks × seeds grid (docs/results.md)

Each subcommand's module is imported only when chosen, so `serve` never loads the
trainer's kernels and `train` never loads a server backend.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

_COMMANDS = {
    "demo": ("trainer.demo.run", "the end-to-end CPU demo"),
    "serve": ("teacher_service.server", "the teacher service"),
    "train": ("trainer.train", "a trainer process"),
    "experiment": ("trainer.experiment.cli", "the experiment grid (run, report)"),
}
_BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"


def _usage() -> str:
    lines = ["usage: hybrid-distill {demo,serve,train,experiment,bench} [options]", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in _COMMANDS.items()]
    lines.append("  bench      run benchmarks/bench_NAME.py (hybrid-distill bench --list)")
    return "\n".join(lines)


def _bench(argv: list[str]) -> int:
    scripts = sorted(p.stem.removeprefix("bench_") for p in _BENCHMARKS.glob("bench_*.py"))
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("benchmarks:", ", ".join(scripts) or "(none: run from a source checkout)")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in scripts:
        print(f"unknown benchmark {name!r}; choose from: {', '.join(scripts)}", file=sys.stderr)
        return 2
    sys.argv = [f"bench_{name}.py", *rest]
    runpy.run_path(str(_BENCHMARKS / f"bench_{name}.py"), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "bench":
        return _bench(rest)
    if command not in _COMMANDS:
        print(f"unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
