"""Summary of a benchmarks/gpu_suite.sh run: OUTDIR/summary.json and OUTDIR/summary.md.

Reads OUTDIR/steps.tsv (one line per step: name, status, exit code, seconds, timeout,
JSON or JUnit XML path, command), each step's JSON (benchmarks) or JUnit XML (pytest),
and the tail of the log of every step that did not succeed.

    python -m benchmarks.gpu_suite_report OUTDIR [--dry-run 0|1] [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 15


def read_steps(out: Path) -> list[dict[str, Any]]:
    steps = []
    for line in (out / "steps.tsv").read_text().splitlines():
        name, status, rc, secs, tmo, figures, command = (line.split("\t") + [""] * 7)[:7]
        steps.append(
            {
                "name": name,
                "status": status,
                "exit_code": None if rc == "-" else int(rc),
                "seconds": float(secs),
                "timeout_s": float(tmo),
                "figures_file": None if figures == "-" else figures,
                "command": command,
            }
        )
    return steps


def junit_counts(path: Path) -> dict[str, int]:
    """Test counts from a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def load_figures(step: dict[str, Any]) -> Any:
    path = step["figures_file"]
    if not path or not Path(path).is_file():
        return None
    try:
        if path.endswith(".xml"):
            return junit_counts(Path(path))
        return json.loads(Path(path).read_text())
    except (ValueError, ET.ParseError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}


def log_tail(out: Path, name: str) -> str:
    log = out / "logs" / f"{name}.log"
    if not log.is_file():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def table(rows: list[dict[str, Any]]) -> list[str]:
    """A Markdown table of flat dict rows (columns: the union of keys, in order seen)."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return lines


def markdown(summary: dict[str, Any], out: Path) -> str:
    env = summary.get("env") or {}
    lines = [
        "# GPU suite"
        + (" (dry run: CPU, tiny sizes; not GPU figures)" if summary["dry_run"] else ""),
        "",
        f"- date: {env.get('date', '?')}; device: {env.get('device', '?')}; "
        f"nvidia-smi: {env.get('nvidia_smi') or 'n/a'}",
        f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda') or 'n/a'}, "
        f"triton {env.get('triton') or 'n/a'}; total {summary['seconds']:.0f} s",
        "",
        "| step | status | seconds | timeout (s) |",
        "|---|---|---:|---:|",
    ]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {s['timeout_s']:.0f} |")
    for s in summary["steps"]:
        fig = s.get("figures")
        if s["name"] == "env":
            continue
        lines += ["", f"## {s['name']} ({s['status']})", "", f"`{s['command']}`"]
        if isinstance(fig, dict):
            if isinstance(fig.get("rows"), list) and fig["rows"]:
                lines += ["", *table(fig["rows"])]
            rest = {k: v for k, v in fig.items() if k != "rows"}
            if rest:
                lines += ["", "```json", json.dumps(rest, indent=1), "```"]
        if s["status"] != "ok":
            tail = log_tail(out, s["name"])
            if tail:
                lines += ["", "log tail:", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dry-run", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    args = ap.parse_args(argv)
    steps = read_steps(args.out)
    for s in steps:
        s["figures"] = load_figures(s)
    env = next((s["figures"] for s in steps if s["name"] == "env"), None)
    summary = {
        "dry_run": bool(args.dry_run),
        "seconds": args.seconds,
        "env": env,
        "ok": all(s["status"] in ("ok", "skipped") for s in steps),
        "steps": steps,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    (args.out / "summary.md").write_text(markdown(summary, args.out))
    print(f"wrote {args.out / 'summary.md'} and summary.json; all steps ok: {summary['ok']}")
    return summary


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
