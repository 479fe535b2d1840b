"""λ schedules: values at chosen steps, the cap, validation."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

from trainer.schedules import LambdaSchedule


@pytest.fixture
def rng() -> random.Random:
    return random.Random(random.randrange(2**31))


def test_constant(rng):
    v = rng.uniform(0, 3)
    s = LambdaSchedule("constant", start=v)
    assert all(s(k) == v for k in (0, 1, 10**6))
    assert LambdaSchedule.from_config(v) == s


def test_linear(rng):
    a, b, n = rng.uniform(0, 1), rng.uniform(1, 5), rng.randint(10, 1000)
    s = LambdaSchedule("linear", start=a, end=b, steps=n)
    assert s(0) == a and s(n) == pytest.approx(b) and s(10 * n) == pytest.approx(b)
    assert s(n // 2) == pytest.approx(a + (b - a) * (n // 2) / n)


def test_exp_grows_to_a_cap(rng):
    a, cap, n = rng.uniform(0.01, 0.1), rng.uniform(1, 5), rng.randint(10, 1000)
    s = LambdaSchedule("exp", start=a, end=cap, steps=n)
    assert s(0) == pytest.approx(a) and s(n) == pytest.approx(cap) and s(5 * n) == cap
    assert s(n // 2) == pytest.approx(math.sqrt(a * cap), rel=1e-2 + 2 / n)
    vals = [s(k) for k in range(0, 2 * n, max(1, n // 20))]
    assert vals == sorted(vals)
    r = LambdaSchedule("exp", start=a, end=cap, rate=0.1)
    assert r(3) == pytest.approx(min(cap, a * math.exp(0.3)))


def test_cosine(rng):
    a, b, n = rng.uniform(0, 1), rng.uniform(1, 5), rng.randint(10, 1000)
    s = LambdaSchedule.from_config({"kind": "cosine", "start": a, "end": b, "steps": n})
    assert s(0) == pytest.approx(a) and s(n) == pytest.approx(b) and s(2 * n) == pytest.approx(b)
    assert s(n / 2) == pytest.approx((a + b) / 2)  # type: ignore[arg-type]
    assert s(n // 10) < a + (b - a) * 0.1  # slow start, unlike linear


def test_step_switches_once(rng):
    a, b, n = rng.uniform(0, 1), rng.uniform(0, 1), rng.randint(1, 1000)
    s = LambdaSchedule.from_config({"kind": "step", "start": a, "end": b, "steps": n})
    assert [s(k) for k in (0, n - 1, n, 10 * n)] == [a, a, b, b]


def test_validation():
    with pytest.raises(ValueError):
        LambdaSchedule("linear", start=0.0, end=1.0)  # no steps
    with pytest.raises(ValueError):
        LambdaSchedule("exp", start=0.0, end=1.0, steps=10)  # cannot grow from 0
    with pytest.raises(ValueError):
        LambdaSchedule("step", start=1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        LambdaSchedule("constant", start=-1.0)
    with pytest.raises(ValueError):
        LambdaSchedule.from_config({"kind": "linear", "stop": 3})
    with pytest.raises(ValueError):
        LambdaSchedule()(-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LambdaSchedule().start = 2.0  # type: ignore[misc]


def test_exp_decays_to_a_floor(rng):
    """end < start: geometric decay from start to the floor end (it used to jump to end)."""
    a, floor, n = rng.uniform(2, 5), rng.uniform(0.05, 1), rng.randint(10, 1000)
    s = LambdaSchedule("exp", start=a, end=floor, steps=n)
    assert s(0) == pytest.approx(a) and s(n) == pytest.approx(floor) and s(5 * n) == floor
    assert s(n // 2) == pytest.approx(math.sqrt(a * floor), rel=1e-2 + 2 / n)
    vals = [s(k) for k in range(0, 2 * n, max(1, n // 20))]
    assert vals == sorted(vals, reverse=True)
    r = LambdaSchedule("exp", start=a, end=floor, rate=-0.1)
    assert r(3) == pytest.approx(max(floor, a * math.exp(-0.3)))
    with pytest.raises(ValueError, match="rate"):
        LambdaSchedule("exp", start=a, end=floor, rate=0.1)  # grows away from end
    with pytest.raises(ValueError, match="rate"):
        LambdaSchedule("exp", start=floor, end=a, rate=-0.1)
