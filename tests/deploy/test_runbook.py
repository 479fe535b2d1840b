"""docs/deploy.md explains every alert, and every alert's runbook link lands there."""

from __future__ import annotations

import re

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
        # GitHub's anchor for a one-word heading is the lower-cased word.
        assert rule["annotations"]["runbook"] == f"docs/deploy.md#{name.lower()}"
        section = text.split(f"### {name}\n", 1)[1].split("\n### ", 1)[0]
        assert len(section.split()) >= 25, f"say what {name} means and what to do"


def test_runbook_names_every_overlay_and_component():
    text = RUNBOOK.read_text()
    for path in sorted((ops.K8S / "overlays").iterdir()) + sorted(
        (ops.K8S / "components").iterdir()
    ):
        assert path.name in text, f"docs/deploy.md never mentions {path.name}"
