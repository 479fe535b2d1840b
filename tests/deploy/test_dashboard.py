"""The Grafana dashboard type-checks against Grafana's published schema (@grafana/schema).

No Grafana server runs here, so the check is static: the test writes a TypeScript file
that assigns the dashboard JSON to `Dashboard`, and each panel's `options` and custom
field config to its plugin's `Options` / `FieldConfig` types, then runs `tsc`. Object
literals get TypeScript's excess-property checks, so a misspelt key fails as surely as
a wrong type. grafana-check/jsonify.ts explains the enum mapping.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

from tests.deploy import ops

# Panel plugin id -> the module of @grafana/schema with its Options and FieldConfig.
_COMPOSABLE = "@grafana/schema/dist/esm/raw/composable"
PANEL_TYPES = {
    "timeseries": f"{_COMPOSABLE}/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen",
    "stat": f"{_COMPOSABLE}/stat/panelcfg/x/StatPanelCfg_types.gen",
}


def _typescript(dash: dict[str, Any]) -> str:
    lines = [
        "import type { Dashboard } from '@grafana/schema';",
        "import type { Jsonify } from './jsonify';",
    ]
    lines += [f"import type * as {kind} from '{module}';" for kind, module in PANEL_TYPES.items()]
    lines.append(f"export const dashboard: Jsonify<Dashboard> = {json.dumps(dash, indent=2)};")
    for panel in ops.dashboard_panels(dash):
        kind = panel["type"]
        assert kind in PANEL_TYPES, f"panel {panel['title']!r}: add {kind!r} to PANEL_TYPES"
        ident = f"panel{panel['id']}"
        options = json.dumps(panel["options"])
        lines.append(f"export const {ident}Options: Jsonify<{kind}.Options> = {options};")
        custom = panel.get("fieldConfig", {}).get("defaults", {}).get("custom")
        if custom is not None:
            lines.append(
                f"export const {ident}Custom: Jsonify<{kind}.FieldConfig> = {json.dumps(custom)};"
            )
    return "\n".join(lines) + "\n"


def _tsc(dash: dict[str, Any]) -> tuple[int, str]:
    tsc = ops.GRAFANA_CHECK / "node_modules" / ".bin" / "tsc"
    if (
        not tsc.exists()
        or not (ops.GRAFANA_CHECK / "node_modules" / "@grafana" / "schema").exists()
    ):
        ops.tool_missing(f"@grafana/schema and typescript are not installed: {ops.SETUP_HINT}")
    # Written next to tsconfig.json so module resolution finds node_modules; the name is
    # unique per process and gitignored (*.generated.ts).
    source = ops.GRAFANA_CHECK / f"dashboard-{os.getpid()}-{random.randrange(10**9)}.generated.ts"
    source.write_text(_typescript(dash))
    try:
        proc = ops.run([tsc, "--noEmit", "-p", ops.GRAFANA_CHECK / "tsconfig.json"], timeout=600)
    finally:
        source.unlink()
    return proc.returncode, proc.stdout + proc.stderr


def test_dashboard_type_checks_against_grafana_schema():
    rc, out = _tsc(ops.dashboard())
    assert rc == 0, out


def test_type_check_rejects_schema_violations():
    """One random violation per run: a misspelt panel key, a wrong type, a bad enum value."""
    dash = copy.deepcopy(ops.dashboard())
    panels = [p for p in ops.dashboard_panels(dash)]
    panel = random.choice(panels)
    mutation = random.choice(["misspelt key", "wrong type", "bad enum"])
    if mutation == "misspelt key":
        panel["gridpos"] = panel.pop("gridPos")
    elif mutation == "wrong type":
        panel["gridPos"]["w"] = "wide"
    else:
        panel["options"]["legend" if panel["type"] == "timeseries" else "textMode"] = (
            {"displayMode": "sideways", "placement": "bottom", "showLegend": True, "calcs": []}
            if panel["type"] == "timeseries"
            else "sideways"
        )
    rc, _ = _tsc(dash)
    assert rc != 0, f"{mutation} on panel {panel['title']!r} passed the type check"


def test_dashboard_structure():
    """Unique panel ids, every query on the templated data source, no overlapping panels."""
    dash = ops.dashboard()
    panels = list(ops.dashboard_panels(dash))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            assert 'namespace="$namespace"' in t["expr"], f"{p['title']} ignores $namespace"


def test_committed_dashboard_is_canonical_json():
    """Stable diffs: 2-space indented JSON with a trailing newline."""
    text = Path(ops.DASHBOARD_FILE).read_text()
    assert text == json.dumps(json.loads(text), indent=2) + "\n"


def test_dashboard_is_provisioned_for_grafanas_sidecar():
    """kustomize (components/monitoring) and Helm both ship the dashboard as a ConfigMap
    labelled grafana_dashboard: "1" holding exactly the committed JSON."""
    from tests.deploy.test_helm import helm_template

    committed = Path(ops.DASHBOARD_FILE).read_text()
    renders = {
        "kustomize production": ops.render_overlay("production"),
        "helm": helm_template()[1],
    }
    for where, text in renders.items():
        maps = [
            d
            for d in ops.documents(text)
            if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"
        ]
        assert len(maps) == 1, where
        [(key, content)] = maps[0]["data"].items()
        assert key.endswith(".json") and content == committed, where
        assert json.loads(content)["uid"] == ops.dashboard()["uid"]
