"""Probes and rollout timing agree with each other and with the server's behaviour.

- The startup probe polls an endpoint that stays 503 while the model loads (/readyz):
  checked against the real side-port app, whose /healthz answers 200 during the load.
- progressDeadlineSeconds and the TeacherNotReady alert's `for` are at least the
  startup probe's allowance, so neither reports a model load the kubelet still waits for.
- Pods that mount the shared volumes chown them only on a root mismatch.
"""

from __future__ import annotations

import random
import re

import pytest
import yaml

from tests.deploy import ops

# Startup allowance S (docs/deploy.md, "Rollout timing").
STARTUP_ALLOWANCE_S = 1200


@pytest.fixture(scope="module", params=ops.OVERLAYS)
def rendered(request):
    return request.param, ops.documents(ops.render_overlay(request.param))


def _teacher(docs):
    deploy = ops.find(docs, "Deployment", "teacher")
    return deploy, deploy["spec"]["template"]["spec"]["containers"][0]


def _allowance(probe: dict) -> int:
    """Longest time the kubelet keeps probing before it gives up on the container."""
    return probe.get("initialDelaySeconds", 0) + probe["periodSeconds"] * probe["failureThreshold"]


def _seconds(duration: str) -> int:
    """A Prometheus duration ('25m', '1h30m', '90s') in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd])", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(int(n) * units[u] for n, u in parts)


def test_startup_probe_waits_for_the_model_load():
    """While the model loads, /healthz is 200 (a startup probe on it would pass at
    once) and /readyz is 503; the probe uses the one that waits."""
    from fastapi.testclient import TestClient
    from prometheus_client import CollectorRegistry

    from teacher_service.http import build_app

    loaded = {"ok": False}
    app = build_app(
        ready=lambda: (loaded["ok"], "ready" if loaded["ok"] else "loading"),
        registry=CollectorRegistry(),
    )
    client = TestClient(app)
    docs = ops.documents(ops.render_overlay("production"))
    _, container = _teacher(docs)
    startup_path = container["startupProbe"]["httpGet"]["path"]
    assert client.get("/healthz").status_code == 200  # why /healthz cannot be the gate
    assert client.get(startup_path).status_code == 503
    loaded["ok"] = True
    assert client.get(startup_path).status_code == 200


def test_startup_allowance_is_the_documented_one(rendered):
    _, docs = rendered
    _, container = _teacher(docs)
    assert _allowance(container["startupProbe"]) == STARTUP_ALLOWANCE_S
    # Liveness only starts after startup succeeded; its own window is short.
    assert _allowance(container["livenessProbe"]) < 60


def test_progress_deadline_covers_the_startup_allowance(rendered):
    _, docs = rendered
    deploy, container = _teacher(docs)
    deadline = deploy["spec"]["progressDeadlineSeconds"]
    assert deadline >= _allowance(container["startupProbe"]) + 60  # plus scheduling, pull


def test_not_ready_alert_waits_at_least_the_startup_allowance():
    rules = yaml.safe_load(ops.RULES_FILE.read_text())
    [alert] = [
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TeacherNotReady"
    ]
    assert _seconds(alert["for"]) >= STARTUP_ALLOWANCE_S


def test_duration_parser_rejects_garbage():
    n = random.randrange(1, 100)
    assert _seconds(f"{n}m") == 60 * n and _seconds(f"1h{n}s") == 3600 + n
    with pytest.raises(AssertionError):
        _seconds(f"{n}x")


def test_shared_volumes_are_chowned_only_on_root_mismatch(rendered):
    """Every pod that mounts a PVC (and so gets an fsGroup chown) uses OnRootMismatch;
    the trainers' shared checkpoint volume in every overlay that has it."""
    name, docs = rendered
    with_pvc = 0
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        if any("persistentVolumeClaim" in v for v in spec.get("volumes", [])):
            with_pvc += 1
            assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", doc[
                "metadata"
            ]["name"]
    job = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]
    assert job["securityContext"].get("fsGroupChangePolicy") == "OnRootMismatch"
    assert with_pvc >= (3 if name.startswith("production") else 0)
