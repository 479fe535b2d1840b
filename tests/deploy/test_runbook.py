"""docs/deploy.md explains every alert, and every alert's runbook link lands there."""

from __future__ import annotations

import random
import re
from urllib.parse import urlsplit

import yaml

from tests.deploy import ops

RUNBOOK = ops.ROOT / "docs" / "deploy.md"


def test_every_alert_links_to_its_runbook_section():
    text = RUNBOOK.read_text()
    headings = set(re.findall(r"^### (\w+)\s*$", text, flags=re.M))
    rules = yaml.safe_load(ops.RULES_FILE.read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert name in headings, f"docs/deploy.md has no '### {name}' section"
        # GitHub's anchor for a one-word heading is the lower-cased word; the base URL
        # is filled in at render time (test_rendered_runbook_urls_are_absolute).
        url = rule["annotations"]["runbook_url"]
        assert url == f"{ops.RUNBOOK_PLACEHOLDER}/docs/deploy.md#{name.lower()}"
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert len(section.split()) >= 25, f"say what {name} means and what to do"


def test_runbook_names_every_overlay_and_component():
    text = RUNBOOK.read_text()
    for path in sorted((ops.K8S / "overlays").iterdir()) + sorted(
        (ops.K8S / "components").iterdir()
    ):
        assert path.name in text, f"docs/deploy.md never mentions {path.name}"


def _runbook_urls(docs) -> dict[str, str]:
    rule = ops.find(docs, "PrometheusRule", "hybrid-distill")
    return {
        r["alert"]: r["annotations"]["runbook_url"]
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    }


def test_rendered_runbook_urls_are_absolute():
    """The production overlay fills RUNBOOK_BASE_URL in from monitoring-settings.yaml:
    every alert links to <base>/docs/deploy.md#<alert>, an absolute https URL."""
    settings = yaml.safe_load(
        (ops.K8S / "overlays" / "production" / "monitoring-settings.yaml").read_text()
    )
    base = settings["data"]["runbookBaseUrl"]
    for overlay in ("production", "production-tls"):
        urls = _runbook_urls(ops.documents(ops.render_overlay(overlay)))
        assert urls
        for alert, url in urls.items():
            assert url == f"{base}/docs/deploy.md#{alert.lower()}"
            parts = urlsplit(url)
            assert parts.scheme == "https" and parts.netloc, url
            assert ops.RUNBOOK_PLACEHOLDER not in url


def test_runbook_base_url_is_a_render_time_value(tmp_path):
    """Change the setting in a copy of the overlay: the rendered links follow it."""
    import shutil

    copy = tmp_path / "k8s"
    shutil.copytree(ops.K8S, copy)
    base = f"https://docs{random.randrange(10**6)}.example.org/hd"
    settings = copy / "overlays" / "production" / "monitoring-settings.yaml"
    text = settings.read_text()
    settings.write_text(re.sub(r"runbookBaseUrl: \S+", f"runbookBaseUrl: {base}", text))
    kubectl = ops.require("kubectl")
    proc = ops.run([kubectl, "kustomize", copy / "overlays" / "production"])
    assert proc.returncode == 0, proc.stderr
    urls = _runbook_urls(ops.documents(proc.stdout))
    assert all(u.startswith(f"{base}/docs/deploy.md#") for u in urls.values()), urls
