"""Every PromQL expression we ship parses, and the alert rules pass their unit tests.

promtool (Debian `prometheus` package) checks the rule file, runs the rule unit tests,
and parses the dashboard's and prometheus-adapter's queries by wrapping each one in a
recording rule. Mutation cases prove the checks can fail.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import yaml

from tests.deploy import ops


def _check_exprs(promtool: Path, exprs: dict[str, str], tmp_path: Path):
    rules = {
        "groups": [
            {
                "name": "expression-check",
                "rules": [
                    {"record": f"check:expr_{i}", "expr": ops.substitute_grafana_variables(e)}
                    for i, e in enumerate(exprs.values())
                ],
            }
        ]
    }
    path = tmp_path / "exprs.rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    return ops.run([promtool, "check", "rules", path])


def test_rule_file_passes_promtool_check():
    promtool = ops.require("promtool")
    proc = ops.run([promtool, "check", "rules", ops.RULES_FILE])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_rules = len(ops.rule_expressions(yaml.safe_load(ops.RULES_FILE.read_text())))
    assert f"SUCCESS: {n_rules} rules found" in proc.stdout


def test_rule_unit_tests_pass_and_cover_every_alert():
    promtool = ops.require("promtool")
    proc = ops.run([promtool, "test", "rules", ops.RULE_TESTS_FILE])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", ops.RULE_TESTS_FILE.read_text()))
    alerts = set(ops.rule_expressions(yaml.safe_load(ops.RULES_FILE.read_text())))
    assert alerts <= tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


def test_rule_unit_tests_fail_when_a_threshold_moves(tmp_path):
    """Raise one random alert's threshold far beyond its test data: the tests must notice."""
    promtool = ops.require("promtool")
    rules = yaml.safe_load(ops.RULES_FILE.read_text())
    alerts = [
        r for g in rules["groups"] for r in g["rules"] if re.search(r">\s*[\d.]+\s*$", r["expr"])
    ]
    victim = random.choice(alerts)
    victim["expr"] = re.sub(r">\s*[\d.]+\s*$", "> 1e12", victim["expr"].rstrip())
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / ops.RULES_FILE.name).write_text(yaml.safe_dump(rules))
    (tmp_path / "rule-tests").mkdir()
    shutil.copy(ops.RULE_TESTS_FILE, tmp_path / "rule-tests" / ops.RULE_TESTS_FILE.name)
    proc = ops.run([promtool, "test", "rules", tmp_path / "rule-tests" / ops.RULE_TESTS_FILE.name])
    assert proc.returncode != 0, f"raising {victim['alert']}'s threshold went unnoticed"
    assert victim["alert"] in proc.stdout + proc.stderr


def test_every_dashboard_expression_parses(tmp_path):
    promtool = ops.require("promtool")
    exprs = ops.dashboard_expressions(ops.dashboard())
    assert len(exprs) >= 20
    proc = _check_exprs(promtool, exprs, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in proc.stdout


def test_prometheus_adapter_query_parses_once_expanded(tmp_path):
    """The adapter's template, expanded as the adapter does for an HPA request."""
    promtool = ops.require("promtool")
    rule = ops.adapter_rule()["custom"][0]
    series = re.match(r"\s*'?([a-z_]+)", rule["seriesQuery"]).group(1)
    expr = (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", 'namespace="hybrid-distill",pod=~"teacher-a|teacher-b"')
        .replace("<<.GroupBy>>", "pod")
    )
    assert "<<" not in expr
    proc = _check_exprs(promtool, {"adapter": expr, "series": rule["seriesQuery"]}, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_expression_check_rejects_broken_promql(tmp_path):
    """The wrapping used above really parses: a dangling operator is refused."""
    promtool = ops.require("promtool")
    broken = random.choice(["sum by (pod) (rate(x[5m])", "a +", "rate(x[5q])", "sum(x) by"])
    proc = _check_exprs(promtool, {"broken": broken}, tmp_path)
    assert proc.returncode != 0
