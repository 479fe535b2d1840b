"""A test that needs a missing ops tool skips on a developer machine and fails in CI.

Runs pytest in a child process on a one-test file that asks `ops.require` for a tool
that does not exist, once with CI unset and once with CI=true.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
from tests.deploy import ops

def test_needs_a_tool():
    ops.require("no-such-tool-{suffix}")
"""


@pytest.mark.parametrize(("ci", "outcome"), [(None, "1 skipped"), ("true", "1 failed")])
def test_missing_tool_skips_locally_and_fails_in_ci(
    tmp_path: Path, ci: str | None, outcome: str
) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE.format(suffix=os.getpid()))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         str(probe)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert outcome in proc.stdout, proc.stdout + proc.stderr
    if ci == "true":
        assert "CI=true: the tool must be installed" in proc.stdout
