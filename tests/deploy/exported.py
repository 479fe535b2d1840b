"""What the services export: metric sample names and label names, read from the code.

Teacher names come from instantiating `teacher_service.metrics.Metrics` and listing its
registry (robust to how the file is written). Trainer names come from trainer/metrics.py
when it exists: its GAUGES table (unlabelled gauges) and every class defined there
that accepts a `registry` keyword, instantiated on a fresh registry and listed the same
way.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

# Sample-name suffixes each metric type exposes (prometheus_client family names carry
# no _total suffix for counters).
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "info": ("_info",),
}


@dataclass
class Exported:
    """Sample names and, per sample name, the label names the exporter sets."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return set(self.labels)


def _add_registry(out: Exported, registry: CollectorRegistry, owner: object) -> None:
    wrappers = {
        w._name: set(w._labelnames)  # private, but the only place label names live
        for w in vars(owner).values()
        if isinstance(w, MetricWrapperBase)
    }
    for family in registry.collect():
        labels = wrappers.get(family.name, set())
        for suffix in _SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            out.labels[family.name + suffix] = labels | extra


def teacher_metrics() -> Exported:
    from teacher_service.metrics import Metrics

    out = Exported()
    metrics = Metrics(CollectorRegistry())
    _add_registry(out, metrics.registry, metrics)
    return out


def trainer_metrics() -> Exported:
    out = Exported()
    if importlib.util.find_spec("trainer.metrics") is None:
        out.notes.append("trainer/metrics.py does not exist yet: trainer_* names not checked")
        return out
    module = importlib.import_module("trainer.metrics")
    # Today's layout: a GAUGES table {gauge name: (row key, help)} of unlabelled gauges.
    for name in getattr(module, "GAUGES", {}):
        out.labels[name] = set()
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ != module.__name__:
            continue
        if "registry" not in inspect.signature(cls).parameters:
            continue
        registry = CollectorRegistry()
        instance = cls(registry=registry)
        _add_registry(out, registry, instance)
    if not out.labels:
        out.notes.append(
            "trainer/metrics.py has no GAUGES table nor a class taking registry=: "
            "trainer_* names not checked"
        )
    return out
