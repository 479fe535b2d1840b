"""RateLimitedLog: one line per key per interval, the rest counted into the next line."""

from __future__ import annotations

import logging

import pytest

from teacher_service.log_limit import RateLimitedLog


def test_one_line_per_key_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.limit"), interval_s=60.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="test.limit")
    logged = [limited.warning("corrupt", "refused %s", i) for i in range(50)]
    assert logged == [True] + [False] * 49
    assert limited.error("bug", "failed") is True  # another key has its own budget
    now[0] += 59.9
    assert limited.warning("corrupt", "refused late") is False
    now[0] += 0.2
    assert limited.warning("corrupt", "refused %s", "again") is True
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "refused 0",
        "failed",
        "refused again (and 50 more like it since the last such line, not logged)",
    ]
