"""The grid's specification: tasks × methods × seeds, read from a YAML file.

    base: base.yaml            # a trainer config (trainer/config.py), relative to this file
    steps: 150                 # optimizer steps per run
    seeds: [0, 1, 2]
    tasks: [reversal, trace, flawed]
    eval_prompts: 128          # held-out prompts for the final evaluation
    warm_steps: 30             # the student's warm start (tasks/teachers.py)
    train_prompts: 4000
    teacher_steps: 300         # optional: override every task's teacher training length
    student: {hidden: 64, layers: 2, heads: 2}   # optional: the student's size (default
                                                 # tasks/teachers.py STUDENT_SIZE)
    methods:                   # name -> dotted trainer-config overrides
      hybrid_g0: {sparse.lam: 2.0}
      offline: {kind: offline} # offline distillation (offline.py), not the on-policy loop
    ablations:                 # optional: more methods, on their own tasks
      tasks: [reversal]
      methods:
        mode_sparse: {from: hybrid_g0, dense.mode: sparse}   # `from` copies a method
        warm_hybrid: {from: hybrid_g0, offline_steps: 500}     # offline first, then on-policy

`offline_steps: N` (on-policy methods): the run's first N steps are offline distillation
(offline.py) and the on-policy loop trains the resulting student for the other steps; the
step and teacher-token counts cover both phases (the usual SFT-then-RL pipeline).
`offline: {...}` adds overrides for that phase only, e.g.
`{offline_steps: 500, optim.decay: cosine, offline: {optim.decay: constant}}`.

A run is (task, method, seed); its directory is <out>/runs/<task>/<method>/seed<k>.
`runs()` lists them in the order they are run: task by task (every main method and seed
of the first task, then the next task), then the ablations seed by seed, so that a grid
stopped early has whole tables (all methods, all seeds) for the tasks it reached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainer.config import load_config
from trainer.demo.teacher_pretrain import ModelSize
from trainer.tasks import get_task
from trainer.tasks.teachers import STUDENT_SIZE

_KEYS = {"base", "steps", "seeds", "tasks", "eval_prompts", "warm_steps", "train_prompts",
         "teacher_steps", "student", "methods", "ablations"}  # fmt: skip
_STUDENT_KEYS = ("hidden", "layers", "heads")


@dataclass(frozen=True)
class Method:
    """A named variant: `kind` "onpolicy" (trainer.train with `overrides`) or "offline";
    an on-policy method may start with `offline_steps` steps of offline distillation."""

    name: str
    overrides: Mapping[str, Any]
    kind: str = "onpolicy"
    offline_steps: int = 0
    offline_overrides: Mapping[str, Any] = field(default_factory=dict)  # that phase only


@dataclass(frozen=True)
class Run:
    task: str
    method: Method
    seed: int

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method.name}/seed{self.seed}"

    def directory(self, out: Path) -> Path:
        return out / "runs" / self.task / self.method.name / f"seed{self.seed}"


@dataclass(frozen=True)
class Grid:
    path: Path
    base: Path
    steps: int
    seeds: tuple[int, ...]
    tasks: tuple[str, ...]
    methods: tuple[Method, ...]
    ablation_tasks: tuple[str, ...] = ()
    ablations: tuple[Method, ...] = ()
    eval_prompts: int = 128
    warm_steps: int = 30
    train_prompts: int = 4000
    teacher_steps: int | None = None  # None: each task's own (tasks/base.py)
    student: ModelSize = STUDENT_SIZE
    raw: Mapping[str, Any] = field(default_factory=dict)

    def runs(self) -> list[Run]:
        out = [Run(t, m, s) for t in self.tasks for s in self.seeds for m in self.methods]
        abl = self.ablation_tasks
        out += [Run(t, m, s) for s in self.seeds for m in self.ablations for t in abl]
        return out

    def method(self, name: str) -> Method:
        for m in (*self.methods, *self.ablations):
            if m.name == name:
                return m
        raise ValueError(f"unknown method {name!r}")


def _methods(raw: Mapping[str, Any], known: dict[str, Method], where: str) -> list[Method]:
    out = []
    for name, spec in raw.items():
        spec = dict(spec or {})
        parent = spec.pop("from", None)
        kind = spec.pop("kind", None)
        offline_steps = spec.pop("offline_steps", None)
        phase = spec.pop("offline", None)
        if phase is not None and not isinstance(phase, Mapping):
            raise ValueError(f"{where}.{name}.offline must be a mapping of config overrides "
                             f"for the offline phase, got {phase!r}")  # fmt: skip
        if parent is not None:
            if parent not in known:
                raise ValueError(f"{where}.{name}.from: unknown method {parent!r}")
            base = known[parent]
            spec = {**base.overrides, **spec}
            kind = kind or base.kind
            offline_steps = base.offline_steps if offline_steps is None else offline_steps
            phase = {**base.offline_overrides, **(phase or {})}
        kind = kind or "onpolicy"
        if kind not in ("onpolicy", "offline"):
            raise ValueError(f"{where}.{name}.kind must be 'onpolicy' or 'offline', got {kind!r}")
        offline_steps = 0 if offline_steps is None else offline_steps
        whole = isinstance(offline_steps, int) and not isinstance(offline_steps, bool)
        if not whole or offline_steps < 0:
            raise ValueError(f"{where}.{name}.offline_steps must be an integer >= 0, "
                             f"got {offline_steps!r}")  # fmt: skip
        if offline_steps and kind != "onpolicy":
            raise ValueError(f"{where}.{name}.offline_steps needs an on-policy method, "
                             f"not kind {kind!r}")  # fmt: skip
        if phase and not offline_steps:
            raise ValueError(f"{where}.{name}.offline sets the offline phase's overrides; "
                             "it needs offline_steps >= 1")  # fmt: skip
        m = Method(name, spec, kind, offline_steps, dict(phase or {}))
        known[name] = m
        out.append(m)
    return out


def offline_overrides(method: Method) -> dict[str, Any]:
    """The config overrides of `method`'s offline distillation (an offline method's whole
    run, or an on-policy method's first offline_steps): its overrides, then its
    `offline` ones. Offline distillation has no Sparse term, so its baseline is "none":
    a group of one sample (G = 1) is then valid."""
    return {**method.overrides, "sparse.baseline": "none", **method.offline_overrides}


def _student(raw: Any, where: Path) -> ModelSize:
    """The `student` key: a size whose every field is a positive integer, heads | hidden."""
    if raw is None:
        return STUDENT_SIZE
    if not isinstance(raw, Mapping) or set(raw) != set(_STUDENT_KEYS):
        raise ValueError(f"{where}: student must be a mapping with exactly the keys "
                         f"{list(_STUDENT_KEYS)}, got {raw!r}")  # fmt: skip
    for key in _STUDENT_KEYS:
        v = raw[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{where}: student.{key} must be an integer >= 1, got {v!r}")
    if raw["hidden"] % raw["heads"]:
        raise ValueError(f"{where}: student.hidden ({raw['hidden']}) must be a multiple of "
                         f"student.heads ({raw['heads']})")  # fmt: skip
    return ModelSize(hidden=raw["hidden"], layers=raw["layers"], heads=raw["heads"])


def load_grid(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Grid:
    """Reads a grid file; `overrides` replace top-level keys (e.g. {"steps": 20})."""
    p = Path(path)
    raw = {**(yaml.safe_load(p.read_text()) or {}), **(overrides or {})}
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"{p}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
    for key in ("base", "methods", "tasks"):
        if key not in raw:
            raise ValueError(f"{p}: missing {key!r}")
    known: dict[str, Method] = {}
    methods = _methods(raw["methods"], known, "methods")
    abl = raw.get("ablations") or {}
    ablations = _methods(abl.get("methods") or {}, known, "ablations.methods")
    tasks = tuple(raw["tasks"])
    for t in (*tasks, *abl.get("tasks", ())):
        get_task(t)  # raises on an unknown task
    base = (p.parent / raw["base"]).resolve()
    for m in (*methods, *ablations):  # a typo fails here, not in every run of the grid
        phases = [("", m.overrides)] if m.kind == "onpolicy" else []
        if m.kind == "offline" or m.offline_steps:
            phases.append(("offline phase: " if m.offline_steps else "",
                           offline_overrides(m)))  # fmt: skip
        for label, overrides in phases:
            try:
                load_config(base, {"student.model_dir": "-", "data.prompts": "-", **overrides})
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{p}: method {m.name}: {label}{exc}") from exc
    steps = int(raw.get("steps", 150))
    if steps < 1:
        raise ValueError(f"{p}: steps must be >= 1, got {steps}")
    for m in (*methods, *ablations):
        if m.offline_steps >= steps:
            raise ValueError(f"{p}: method {m.name}: offline_steps ({m.offline_steps}) must be "
                             f"below steps ({steps}), leaving on-policy steps")  # fmt: skip
    return Grid(
        path=p,
        base=base,
        steps=steps,
        seeds=tuple(int(s) for s in raw.get("seeds", (0,))),
        tasks=tasks,
        methods=tuple(methods),
        ablation_tasks=tuple(abl.get("tasks", ())),
        ablations=tuple(ablations),
        eval_prompts=int(raw.get("eval_prompts", 128)),
        warm_steps=int(raw.get("warm_steps", 30)),
        train_prompts=int(raw.get("train_prompts", 4000)),
        teacher_steps=None if raw.get("teacher_steps") is None else int(raw["teacher_steps"]),
        student=_student(raw.get("student"), p),
        raw=raw,
    )
