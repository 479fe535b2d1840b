"""What a training run shows: progress bar, JSONL (+ TensorBoard), Prometheus gauges, plots.

`RunLog` is built on every rank and does nothing on ranks > 0, so the loop calls it
unconditionally. Per step it receives a flat dict of floats (the keys are listed in
docs/trainer.md: each loss part, KL, reward, λ, student mass on the support, the dropped
tail term, teacher-wait fraction, tokens/s, ...) and

- appends {"step": k, ...} to <out_dir>/metrics.jsonl,
- writes TensorBoard scalars when asked (needs the `tensorboard` package),
- sets the Prometheus gauges below when a metrics port is given (the deploy dashboard
  uses exactly these names),
- updates the tqdm bar's live numbers.

`plot_metrics` turns metrics.jsonl into reward.png and kl.png at the end of a run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Prometheus gauge name -> metrics key (docs/trainer.md; deploy/monitoring dashboards).
GAUGES = {
    "trainer_teacher_wait_fraction": (
        "teacher_wait_frac",
        "Fraction of the last step's time spent waiting for the teacher",
    ),
    "trainer_step": ("step", "Optimizer steps completed"),
    "trainer_tokens_per_second": ("tokens_per_s", "Response tokens trained on per second"),
    "trainer_reward_mean": ("reward", "Mean combined reward of the last step's samples"),
    "trainer_kl_mean": ("kl", "Mean per-token KL(student || teacher) on the Dense support"),
}
_BAR_KEYS = ("loss", "reward", "kl", "lam", "teacher_wait_frac", "tokens_per_s")


class RunLog:
    """Rank-0 logging sinks; a no-op object elsewhere."""

    def __init__(
        self,
        out_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = False,
        metrics_port: int = 0,
        progress: bool = True,
    ) -> None:
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._gauges: dict[str, Any] = {}
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fresh run starts a fresh file; a resumed one keeps the rows up to its step
        # (a crash after the last checkpoint may have logged steps that will be redone).
        kept = (
            [r for r in read_metrics(self.path) if r["step"] <= start_step]
            if (start_step and self.path.exists())
            else []
        )
        self._file = self.path.open("w", encoding="utf-8")
        for row in kept:
            self._file.write(json.dumps(row) + "\n")
        if tensorboard:
            self._tb = _open_tensorboard(Path(out_dir) / "tensorboard")
        if metrics_port:
            self._gauges = _start_prometheus(metrics_port)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Records one step's metrics (a flat dict of floats)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: float(v) for k, v in values.items()}}
        assert self._file is not None
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)
        for name, gauge in self._gauges.items():
            key = GAUGES[name][0]
            if key in row:
                gauge.set(row[key])

    def progress(self, step: int, values: Mapping[str, float]) -> None:
        """Advances the bar to `step` with the live numbers."""
        if self._bar is None:
            return
        self._bar.set_postfix(
            {k: f"{values[k]:.3g}" for k in _BAR_KEYS if k in values}, refresh=False
        )
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()


def _open_tensorboard(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("run.tensorboard is on but the tensorboard package is missing; skipping it")
        return None
    return SummaryWriter(str(path))


def _start_prometheus(port: int) -> dict[str, Any]:
    """Serves the GAUGES on 0.0.0.0:port from a private registry."""
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    gauges = {name: Gauge(name, doc, registry=registry) for name, (_, doc) in GAUGES.items()}
    start_http_server(port, registry=registry)
    log.info("trainer metrics on :%s/metrics", port)
    return gauges


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """The rows of a metrics.jsonl."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def plot_metrics(path: str | Path, out_dir: str | Path) -> list[Path]:
    """reward.png and kl.png from metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    written = []
    for key, title, extra in (
        ("reward", "reward (mean over samples)", None),
        ("kl", "KL(student ‖ teacher) per token", "kl_sampled"),
    ):
        steps = [r["step"] for r in rows if key in r]
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [r[key] for r in rows if key in r], label=key)
        if extra and any(extra in r for r in rows):
            ax.plot([r["step"] for r in rows if extra in r], [r[extra] for r in rows if extra in r],
                    label=f"{extra} (sampled-token estimate)", alpha=0.7)  # fmt: skip
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = Path(out_dir) / f"{key}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
