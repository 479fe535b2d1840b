"""The grid's results table and plots, from every finished run's result.json.

Per (task, method), over the seeds that finished (mean ± sample std, n = seeds):

- steps to 95 %: the first step at which the student's training-sample reward, averaged
  over the last `window` steps (a full window), reaches 0.95 × the teacher's reward
  (teacher_eval.json: the teacher's temperature-1 samples on the held-out prompts);
  "not reached in N" when no seed got there, "k/n" when only some did (the mean is over
  those that did);
- teacher tokens to 95 %: the tokens the teacher scored (on-policy) or generated
  (offline) up to that step; pure RL needs none (its gradient does not use the teacher);
- final reward, greedy accuracy and KL: the held-out evaluation at the end (reward of
  temperature-1 samples; exact full-vocabulary per-token KL(student ‖ teacher) on them);
- response length and KL per sequence (length × the sampled-token KL estimate) over the
  last `window` training steps: a per-token KL can rise while the per-sequence KL, the
  quantity the objective sums, falls (responses cut short; docs/results.md).

Then, per task, the issue's question for every hybrid method (Dense + reward): did it
reach 95 % in at most a fifth of pure RL's steps, and does it end at or above offline
distillation (of several offline variants, the one that ends highest)? When pure RL
never reached 95 % in N steps, hybrid steps / N is an upper bound on the ratio.

Writes <out>/results.{csv,json,md} and <out>/plots/<task>_reward_vs_{step,tokens}.png.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from trainer.experiment.archive import read_result
from trainer.experiment.files import ARCHIVED, RESULT, write_atomic, write_json

WINDOW = 10
TARGET = 0.95


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every finished run under `out`: a live result.json, else an archived
    result.json.gz (archive.py), one record per run directory."""
    found: dict[Path, Path] = {}
    for path in sorted((out / "runs").glob("*/*/seed*/result.json*")):
        if path.name == RESULT or (path.name == ARCHIVED and path.parent not in found):
            found[path.parent] = path
    return [read_result(path) for _, path in sorted(found.items())]


def smoothed(values: list[float], window: int = WINDOW) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def reach(record: dict[str, Any], target: float = TARGET) -> tuple[int | None, float | None]:
    """(step, cumulative teacher tokens) at which the smoothed reward first reaches
    target × the teacher's reward, or (None, None)."""
    hist = record["history"]
    goal = target * record["teacher"]["reward"]
    rewards = smoothed([h["reward"] for h in hist])
    tokens = 0.0
    for i, (h, r) in enumerate(zip(hist, rewards, strict=True)):
        tokens += h.get("teacher_tokens", 0.0)
        if i + 1 >= min(WINDOW, len(hist)) and r >= goal:
            return h["step"], tokens
    return None, None


def _tail_mean(record: dict[str, Any], key: str, window: int = WINDOW) -> float:
    rows = record["history"][-window:]
    if key == "kl_seq":
        vals = [h["kl_sampled"] * h["response_len"] for h in rows if "kl_sampled" in h]
    else:
        vals = [h[key] for h in rows if key in h]
    return statistics.fmean(vals) if vals else math.nan


def _ms(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def role(record: dict[str, Any]) -> str:
    """What a run is in the comparison: offline, pure_rl (β = 0), opd (λ ≡ 0) or hybrid;
    after an offline phase (`offline_steps`), β = 0 is offline_rl (not pure RL's bound)."""
    if record["kind"] == "offline":
        return "offline"
    config = record.get("config") or {}
    if config.get("dense", {}).get("kl_coef", 1.0) == 0:
        return "offline_rl" if record.get("offline_steps") else "pure_rl"
    lam = config.get("sparse", {}).get("lam", {})
    if not lam.get("start") and not lam.get("end"):
        return "opd"
    return "hybrid"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[(rec["task"], rec["method"])].append(rec)
    rows = []
    for (task, method), recs in sorted(groups.items()):
        hits = [reach(r) for r in recs]
        steps = [float(s) for s, _ in hits if s is not None]
        toks = [float(t) for s, t in hits if s is not None]
        row: dict[str, Any] = {"task": task, "method": method, "role": role(recs[0]),
                               "seeds": len(recs), "steps": recs[0]["steps"],
                               "reached": len(steps)}  # fmt: skip
        for name, xs in (
            ("steps_to_95", steps),
            ("teacher_tokens_to_95", toks),
            ("final_reward", [r["final"]["reward"] for r in recs]),
            ("final_accuracy", [r["final"]["accuracy"] for r in recs]),
            ("final_kl", [r["final"]["kl"] for r in recs]),
            ("final_len", [_tail_mean(r, "response_len") for r in recs]),
            ("final_kl_seq", [_tail_mean(r, "kl_seq") for r in recs]),
            ("teacher_tokens_total", [sum(h.get("teacher_tokens", 0.0) for h in r["history"])
                                      for r in recs]),
            ("wall_s", [r["wall_s"] for r in recs]),
        ):  # fmt: skip
            row[name], row[name + "_std"] = _ms(xs)
        row["teacher_reward"] = recs[0]["teacher"]["reward"]
        shown = dict(recs[0]["overrides"])
        if recs[0].get("offline_steps"):
            shown["offline_steps"] = recs[0]["offline_steps"]
        if recs[0].get("offline_overrides"):
            shown["offline"] = recs[0]["offline_overrides"]
        row["overrides"] = json.dumps(shown, sort_keys=True)
        rows.append(row)
    return rows


def _fmt(row: dict[str, Any], key: str, digits: int = 3) -> str:
    m, s = row[key], row[key + "_std"]
    if math.isnan(m):
        return "—"
    if digits == 0:
        return f"{m:,.0f} ± {s:,.0f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| task | method | seeds | steps to 95 % | teacher tokens to 95 % | final reward "
            "| greedy acc. | final KL / token | length | KL / sequence | teacher reward "
            "| config overrides |")  # fmt: skip
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        if r["reached"] == 0:
            steps, toks = f"not reached in {r['steps']}", "—"
        else:
            frac = "" if r["reached"] == r["seeds"] else f" ({r['reached']}/{r['seeds']})"
            steps, toks = _fmt(r, "steps_to_95", 0) + frac, _fmt(r, "teacher_tokens_to_95", 0)
        lines.append(
            f"| {r['task']} | {r['method']} | {r['seeds']} | {steps} | {toks} "
            f"| {_fmt(r, 'final_reward')} | {_fmt(r, 'final_accuracy', 2)} "
            f"| {_fmt(r, 'final_kl')} | {_fmt(r, 'final_len', 1)} | {_fmt(r, 'final_kl_seq', 1)} "
            f"| {r['teacher_reward']:.3f} | `{r['overrides']}` |"
        )
    return "\n".join(lines) + "\n"


def _ratio(hyb: dict[str, Any], rl: dict[str, Any] | None) -> tuple[str, str]:
    """(ratio text, verdict) for "hybrid steps to 95 % ≤ 1/5 of pure RL's"."""
    if hyb["reached"] < hyb["seeds"]:
        return f"not reached ({hyb['reached']}/{hyb['seeds']} seeds)", "no"
    if rl is None:
        return "no pure RL run", "—"
    h = hyb["steps_to_95"]
    if rl["reached"] == 0:  # pure RL needs more than its N steps: h / N bounds the ratio
        bound = h / rl["steps"]
        return f"< {bound:.2f} (pure RL > {rl['steps']})", "yes" if bound <= 0.2 else "unknown"
    ratio = h / rl["steps_to_95"]
    partial = "" if rl["reached"] == rl["seeds"] else f" (pure RL {rl['reached']}/{rl['seeds']})"
    return f"{ratio:.2f}{partial}", "yes" if ratio <= 0.2 else "no"


def comparison(rows: list[dict[str, Any]]) -> str:
    """The issue's question per task and hybrid method, as a Markdown table."""
    lines = ["| task | hybrid method | steps to 95 % | vs pure RL's steps | ≤ 1/5 | "
             "final − offline (± s.e.) | ≥ offline |", "|" + "---|" * 7]  # fmt: skip
    for task in sorted({r["task"] for r in rows}):
        # The baselines: of several pure RL rows (run for longer) the longest, the bound;
        # of several offline rows (variants) the highest final reward, the strictest
        # comparison, named in the cell.
        pure = [r for r in rows if r["task"] == task and r["role"] == "pure_rl"]
        offline = [r for r in rows if r["task"] == task and r["role"] == "offline"]
        rl = max(pure, key=lambda r: r["steps"]) if pure else None
        off = max(offline, key=lambda r: r["final_reward"]) if offline else None
        for hyb in (r for r in rows if r["task"] == task and r["role"] == "hybrid"):
            text, verdict = _ratio(hyb, rl)
            steps = "—" if not hyb["reached"] else f"{hyb['steps_to_95']:,.0f}"
            if off is None:
                diff, above = "no offline run", "—"
            else:
                d = hyb["final_reward"] - off["final_reward"]
                se = math.sqrt(hyb["final_reward_std"] ** 2 / hyb["seeds"]
                               + off["final_reward_std"] ** 2 / off["seeds"])  # fmt: skip
                diff, above = f"{d:+.3f} ± {se:.3f}", "yes" if d >= 0 else "no"
                if len(offline) > 1:
                    diff += f" (vs {off['method']})"
            lines.append(f"| {task} | {hyb['method']} | {steps} | {text} | {verdict} "
                         f"| {diff} | {above} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        by_task[rec["task"]][rec["method"]].append(rec)
    written = []
    for task, methods in sorted(by_task.items()):
        for xkey in ("step", "tokens"):
            fig, ax = plt.subplots(figsize=(7, 4))
            for method, recs in sorted(methods.items()):
                n = min(len(r["history"]) for r in recs)
                curves = [smoothed([h["reward"] for h in r["history"][:n]]) for r in recs]
                y = [statistics.fmean(c[i] for c in curves) for i in range(n)]
                if xkey == "step":
                    x = list(range(1, n + 1))
                else:
                    cums = []
                    for r in recs:
                        acc, cum = 0.0, []
                        for h in r["history"][:n]:
                            acc += h.get("teacher_tokens", 0.0)
                            cum.append(acc)
                        cums.append(cum)
                    x = [statistics.fmean(c[i] for c in cums) for i in range(n)]
                    if x[-1] == 0:  # pure RL scores no teacher tokens: nothing to plot
                        continue
                ax.plot(x, y, label=f"{method} (n={len(recs)})")
            teacher = next(iter(methods.values()))[0]["teacher"]["reward"]
            ax.axhline(teacher, color="k", ls="--", lw=0.8, label="teacher")
            ax.axhline(TARGET * teacher, color="k", ls=":", lw=0.8, label="95 % of teacher")
            ax.set_xlabel("step" if xkey == "step" else "teacher tokens scored")
            ax.set_ylabel(f"reward (trailing mean of {WINDOW} steps)")
            ax.set_title(f"{task}: reward vs {'step' if xkey == 'step' else 'teacher tokens'}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out / "plots" / f"{task}_reward_vs_{xkey}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def write_report(out: Path, with_plots: bool = True) -> list[dict[str, Any]]:
    """Writes results.{csv,json,md} (and plots) under `out`; returns the rows."""
    records = load_results(out)
    rows = summarise(records)
    write_json(out / "results.json", rows)
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(out / "results.csv", buf.getvalue())
    write_atomic(out / "results.md", markdown(rows) + "\n" + comparison(rows))
    if with_plots and records:
        plots(records, out)
    return rows
