"""Per-client metric labels stay bounded, and quiet clients give their slot back."""

from __future__ import annotations

import random

from teacher_service.metrics import OTHER_CLIENT, ClientLabeler, Metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_at_most_max_clients_are_named_and_the_rest_are_other() -> None:
    n = random.randint(2, 9)
    labeler = ClientLabeler(n, idle_s=60.0, clock=FakeClock())
    names = [f"job-{random.randrange(10**9)}-{i}" for i in range(n + 5)]
    labels = [labeler(name) for name in names]
    assert labels[:n] == names[:n]
    assert labels[n:] == [OTHER_CLIENT] * 5
    assert [labeler(name) for name in names[:n]] == names[:n]  # stable once named


def test_a_quiet_client_gives_its_slot_and_series_to_a_new_one() -> None:
    clock = FakeClock()
    metrics = Metrics(max_clients=2)
    metrics.client_label = ClientLabeler(
        2, idle_s=60.0, on_evict=metrics.client_tokens.remove, clock=clock
    )
    get = metrics.registry.get_sample_value
    for name in ("a", "b"):
        metrics.client_tokens.labels(metrics.client_label(name)).inc(3)
    clock.now = 30.0
    metrics.client_label("b")  # b is active; a has been quiet since t=0
    assert metrics.client_label("c") == OTHER_CLIENT  # nobody quiet for 60 s yet
    clock.now = 70.0
    assert metrics.client_label("c") == "c"  # a was quiet for 70 s: its slot is reused
    assert get("teacher_service_client_tokens_total", {"client": "a"}) is None
    assert get("teacher_service_client_tokens_total", {"client": "b"}) == 3
    assert metrics.client_label("d") == OTHER_CLIENT  # b was seen 40 s ago: kept
