"""The live monitoring check passes: real service + real Prometheus on loopback.

Runs deploy/monitoring/live_check.py (see its docstring for the steps): series exist and
match the traffic, rates are positive, no alert fires on a healthy service, SIGTERM
drains to exit 0, and TeacherDown / TeacherUnavailable fire once the service is gone.
"""

from __future__ import annotations

import sys

from tests.deploy import ops


def test_live_check_against_real_prometheus(tmp_path):
    ops.require("prometheus")
    proc = ops.run(
        [
            sys.executable,
            ops.MONITORING / "live_check.py",
            "--timeout-s",
            "200",
            "--keep",
            tmp_path / "live",
        ],
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert proc.stdout.rstrip().endswith("live check passed")
    assert "alerts firing: ['TeacherDown', 'TeacherUnavailable']" in out
