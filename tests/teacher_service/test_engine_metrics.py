"""The engine-metrics view re-exports exactly the prefixed families of another registry."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from teacher_service.engine_metrics import PrefixView
from teacher_service.metrics import Metrics


def test_view_exports_the_prefixed_families_at_scrape_time_and_nothing_else() -> None:
    engine = CollectorRegistry()
    service = Metrics()
    service.registry.register(PrefixView(lambda: engine, "vllm:"))
    # Registered after the view, as the engine's logger is: still seen at scrape time.
    running = Gauge("vllm:num_requests_running", "running", ["model_name"], registry=engine)
    Counter("process_unrelated", "not an engine metric", registry=engine)
    value = random.randint(1, 1000)
    running.labels("teacher").set(value)

    text = generate_latest(service.registry).decode()
    assert f'vllm:num_requests_running{{model_name="teacher"}} {float(value)}' in text
    assert "process_unrelated" not in text
    assert "teacher_service_" in text  # the service's own families are still there
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


def test_view_refuses_an_empty_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        PrefixView(CollectorRegistry, "")
