"""Shared helpers for the deployment checks: paths, tool lookup, rendering, PromQL scans.

Every external tool is optional here and required in CI: `require(...)` skips a test
with the reason and the install command when a tool is missing on a developer machine
(`bash tools/setup_ops_tools.sh` installs them all). In CI (`CI=true`, as CI services
set it) the same test fails instead (`tool_missing`), so a missing install step cannot
hide behind a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("production", "production-tls", "cpu-dev")
MONITORING = DEPLOY / "monitoring"
RULES_FILE = MONITORING / "rules" / "hybrid-distill.rules.yaml"
RULE_TESTS_FILE = MONITORING / "rule-tests" / "hybrid-distill.test.yaml"
DASHBOARD_FILE = MONITORING / "dashboards" / "hybrid-distill.json"
ADAPTER_DOC = MONITORING / "prometheus-adapter.md"
GRAFANA_CHECK = MONITORING / "grafana-check"
# Rule files carry this in every runbook_url; overlays and the Helm chart replace it.
RUNBOOK_PLACEHOLDER = "RUNBOOK_BASE_URL"
VENV_BIN = ROOT / ".venv" / "bin"
OPS_VENV_BIN = ROOT / ".venv-ops" / "bin"
SETUP_HINT = "run `bash tools/setup_ops_tools.sh`"

# Labels Prometheus adds to every scraped series (target labels of the Operator's
# ServiceMonitor/PodMonitor, and of the live check's static config).
TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "pod", "service", "container", "endpoint"}
)


def find_tool(name: str) -> Path | None:
    """A tool from the project venvs first, then PATH."""
    for folder in (VENV_BIN, OPS_VENV_BIN):
        candidate = folder / name
        if candidate.exists():
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def in_ci() -> bool:
    """True under CI (the CI variable every CI service sets to "true")."""
    return os.environ.get("CI") == "true"


def tool_missing(message: str) -> NoReturn:
    """Skips the test on a developer machine; fails it in CI, where every tool the
    tests use must be installed (a skip there would hide a missing install step)."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: the tool must be installed)", pytrace=False)
    pytest.skip(message)


def require(name: str) -> Path:
    """The tool's path, or skip the test (fail it in CI) saying how to install it."""
    path = find_tool(name)
    if path is None:
        tool_missing(f"{name} is not installed: {SETUP_HINT}")
    return path


def run(
    cmd: list[str | Path], cwd: Path = ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run a command, capturing text output (never raising on a non-zero exit)."""
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def render_overlay(overlay: str) -> str:
    """`kubectl kustomize` output for one overlay, as YAML text."""
    kubectl = require("kubectl")
    proc = run([kubectl, "kustomize", K8S / "overlays" / overlay])
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def documents(text: str) -> list[dict[str, Any]]:
    """The non-empty YAML documents of a multi-document stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args from the container's env."""
    return re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], text)


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of this kind and name (fails the test when absent)."""
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)]
    assert len(hits) == 1, f"expected one {kind} {name}, found {len(hits)}"
    return hits[0]


def pod_containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Init and regular containers of a pod spec."""
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


# --- PromQL scanning ------------------------------------------------------------------

_METRIC = re.compile(r"\b((?:teacher_service|trainer)_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b((?:teacher_service|trainer)_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def metric_names(expr: str) -> set[str]:
    """Project metric names (teacher_service_*, trainer_*) an expression reads."""
    return set(_METRIC.findall(expr))


def selector_labels(expr: str) -> set[tuple[str, str]]:
    """(metric, label) pairs for every label matcher inside a project metric's selector."""
    pairs: set[tuple[str, str]] = set()
    for metric, body in _SELECTOR.findall(expr):
        # Drop quoted values first so a matcher value never looks like a label name.
        for label in _MATCHER.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', body)):
            pairs.add((metric, label))
    return pairs


def rule_expressions(rules: dict[str, Any]) -> dict[str, str]:
    """{alert or record name: expr} of a Prometheus rule file."""
    out = {}
    for group in rules["groups"]:
        for rule in group["rules"]:
            out[rule.get("alert") or rule["record"]] = rule["expr"]
    return out


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text())


def dashboard_panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every non-row panel, including panels nested in collapsed rows."""
    for panel in dash["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_expressions(dash: dict[str, Any]) -> dict[str, str]:
    """{'<panel title> / <refId>': expr} for every PromQL target and query variable."""
    out = {}
    for panel in dashboard_panels(dash):
        for target in panel.get("targets", []):
            out[f"{panel['title']} / {target['refId']}"] = target["expr"]
    for var in dash.get("templating", {}).get("list", []):
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            out[f"variable {var['name']}"] = match.group(1) if match else query
    return out


def substitute_grafana_variables(expr: str) -> str:
    """Replace Grafana's template variables with values PromQL can parse."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?([a-zA-Z_]\w*)\}?", r"\1", expr)


def adapter_rule() -> dict[str, Any]:
    """The prometheus-adapter rule documented in prometheus-adapter.md (its YAML block)."""
    match = re.search(r"```yaml\n(.*?)```", ADAPTER_DOC.read_text(), re.S)
    assert match, f"{ADAPTER_DOC} has no ```yaml block"
    return yaml.safe_load(match.group(1))
