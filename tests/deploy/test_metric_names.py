"""Every metric the alert rules, the dashboard and the autoscaler read is exported.

The exported names come from the code (tests/deploy/exported.py): the teacher's
`Metrics()` registry, and trainer/metrics.py once it exists. Label matchers inside a
selector must name a label the metric has, or one Prometheus adds at scrape time.
"""

from __future__ import annotations

import random

import pytest
import yaml

from tests.deploy import exported, ops


def _references() -> dict[str, str]:
    """{where: PromQL text} for every expression we ship."""
    refs = {
        f"rule {k}": v
        for k, v in ops.rule_expressions(yaml.safe_load(ops.RULES_FILE.read_text())).items()
    }
    refs.update(
        {f"dashboard {k}": v for k, v in ops.dashboard_expressions(ops.dashboard()).items()}
    )
    adapter = ops.adapter_rule()["custom"][0]
    refs["prometheus-adapter seriesQuery"] = adapter["seriesQuery"]
    refs["prometheus-adapter name"] = adapter["name"]["as"]
    hpa = yaml.safe_load((ops.K8S / "components" / "monitoring" / "teacher-hpa.yaml").read_text())
    for i, metric in enumerate(hpa["spec"]["metrics"]):
        refs[f"hpa metric {i}"] = metric["pods"]["metric"]["name"]
    return refs


def _problems(refs: dict[str, str], prefix: str, known: exported.Exported) -> list[str]:
    problems = []
    for where, expr in refs.items():
        for name in sorted(ops.metric_names(expr)):
            if name.startswith(prefix) and name not in known.labels:
                problems.append(f"{where}: {name} is not exported")
        for name, label in sorted(ops.selector_labels(expr)):
            if not name.startswith(prefix) or name not in known.labels:
                continue
            if label not in known.labels[name] | ops.TARGET_LABELS:
                problems.append(f"{where}: {name} has no label {label!r}")
    return problems


def test_every_teacher_metric_referenced_is_exported():
    known = exported.teacher_metrics()
    refs = _references()
    used = set().union(*(ops.metric_names(e) for e in refs.values()))
    assert {n for n in used if n.startswith("teacher_service_")}, "no teacher metric referenced?"
    assert _problems(refs, "teacher_service_", known) == []


def test_every_trainer_metric_referenced_is_exported():
    known = exported.trainer_metrics()
    if known.notes:
        pytest.skip("; ".join(known.notes))
    assert _problems(_references(), "trainer_", known) == []


def test_dashboard_covers_the_required_views():
    """The issue's list: throughput, latency, queue, batch, errors, per-client, wait."""
    used = set().union(
        *(ops.metric_names(e) for e in ops.dashboard_expressions(ops.dashboard()).values())
    )
    required = {
        "teacher_service_tokens_scored_total",
        "teacher_service_request_latency_seconds_bucket",
        "teacher_service_queue_depth",
        "teacher_service_batch_size_bucket",
        "teacher_service_requests_total",
        "teacher_service_client_tokens_total",
        "trainer_teacher_wait_fraction",
    }
    assert required <= used, sorted(required - used)


def test_checker_flags_unknown_names_and_labels():
    """A made-up metric or label in an expression is reported, so the checks above bite."""
    known = exported.teacher_metrics()
    real = random.choice(sorted(n for n in known.labels if n.endswith("_total")))
    bogus_name = f"teacher_service_no_such_metric_{random.randrange(10**6)}_total"
    bogus_label = f"nolabel{random.randrange(10**6)}"
    refs = {"fake 1": f"rate({bogus_name}[5m])", "fake 2": f'rate({real}{{{bogus_label}="x"}}[5m])'}
    problems = _problems(refs, "teacher_service_", known)
    assert problems == [
        f"fake 1: {bogus_name} is not exported",
        f"fake 2: {real} has no label {bogus_label!r}",
    ]
