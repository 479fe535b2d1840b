"""Schedules over the training step k for the reward weight λ (MATH.md § Schedules, paper
§5.1) and the discount γ of the future costs (SparseConfig.gamma, which keeps it in [0, 1]).

Small λ early (imitation, "cold start"), large late (reward); γ = 0 while the student is
far from its teacher, 1 once it is near (docs/results.md § γ > 0). All forms hold their final
value after `steps`:

    constant  λ(k) = start
    linear    λ(k) = start + (end − start) · min(k / steps, 1)
    exp       λ(k) = start · exp(rate · k), clamped at end (a cap when end > start, a floor
              when end < start),  rate = ln(end / start) / steps if unset
    cosine    λ(k) = start + (end − start) · (1 − cos(π · min(k / steps, 1))) / 2
    step      λ(k) = start for k < steps, end from then on (a switch)

Usage: LambdaSchedule("linear", start=0.0, end=1.0, steps=1000)(step) -> float.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ScheduleKind = Literal["constant", "linear", "exp", "cosine", "step"]


@dataclass(frozen=True)
class LambdaSchedule:
    """λ as a function of the training step; see the module docstring for each kind."""

    kind: ScheduleKind = "constant"
    start: float = 0.0  # λ at step 0 (the constant value for "constant")
    end: float | None = None  # final value (cap or floor for "exp"); unused for "constant"
    steps: int | None = None  # ramp length in steps; "exp" may give rate instead
    rate: float | None = None  # "exp" only: growth per step, ln-units (< 0 decays)

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "exp", "cosine", "step"):
            raise ValueError(f"unknown schedule kind {self.kind!r}")
        if self.start < 0 or (self.end is not None and self.end < 0):
            raise ValueError(
                f"a schedule's start and end must be >= 0, got {self.start}, {self.end}"
            )
        if self.kind == "constant":
            return
        if self.end is None:
            raise ValueError(f"a {self.kind!r} schedule needs end")
        if self.kind == "exp":
            if self.start <= 0:
                raise ValueError("an 'exp' schedule needs start > 0 (it grows geometrically)")
            if self.end <= 0:
                raise ValueError("an 'exp' schedule needs end > 0 (it decays geometrically)")
            if self.rate is None and (self.steps is None or self.steps <= 0):
                raise ValueError("an 'exp' schedule needs rate, or steps > 0")
            if self.rate is not None and self.rate * (self.end - self.start) < 0:
                raise ValueError(
                    f"an 'exp' schedule's rate {self.rate} moves λ away from end {self.end} "
                    f"(start {self.start}): its sign must be that of end − start"
                )
        elif self.steps is None or self.steps <= 0:
            raise ValueError(f"a {self.kind!r} schedule needs steps > 0")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | float) -> LambdaSchedule:
        """From a number (constant λ) or a mapping with the field names above."""
        if isinstance(cfg, int | float):
            return cls("constant", start=float(cfg))
        unknown = set(cfg) - {"kind", "start", "end", "steps", "rate"}
        if unknown:
            raise ValueError(f"unknown schedule fields: {sorted(unknown)}")
        return cls(**dict(cfg))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.kind == "constant":
            return float(self.start)
        end = float(self.end)  # type: ignore[arg-type]  # checked in __post_init__
        if self.kind == "exp":
            rate = self.rate
            if rate is None:
                rate = math.log(end / self.start) / self.steps  # type: ignore[operator]
            value = self.start * math.exp(rate * step)
            # Clamp towards end: a cap when growing, a floor when decaying (end < start).
            return min(end, value) if end >= self.start else max(end, value)
        if self.kind == "step":
            return self.start if step < self.steps else end  # type: ignore[operator]
        frac = min(step / self.steps, 1.0)  # type: ignore[operator]
        if self.kind == "cosine":
            frac = (1.0 - math.cos(math.pi * frac)) / 2.0
        return self.start + (end - self.start) * frac
