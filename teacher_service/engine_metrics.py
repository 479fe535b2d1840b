"""A view of another registry's metric families, re-exported on the service's /metrics.

vLLM records its engine metrics (KV-cache usage, running and waiting requests, ...) in
the process-wide `prometheus_client.REGISTRY` of the API process (or a multiprocess
registry when PROMETHEUS_MULTIPROC_DIR is set), while the side port serves the service's
own registry. Registering a `PrefixView` of the engine's registry on the service's one
puts the `vllm:` families on the one endpoint Prometheus already scrapes, without
copying the global registry's unrelated collectors (process, GC, platform).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector


class PrefixView(Collector):
    """Collects, at scrape time, the families of `source()` whose name starts with `prefix`.

    `source` is a callable so that a registry created after this view (the engine is
    built after the side port starts) is still the one read.
    """

    def __init__(self, source: Callable[[], CollectorRegistry], prefix: str) -> None:
        if not prefix:
            raise ValueError("prefix: must be non-empty (a view of everything duplicates)")
        self._source = source
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        for family in self._source().collect():
            if family.name.startswith(self._prefix):
                yield family

    def describe(self) -> list[Metric]:
        # Empty: the families appear only once the engine has registered them, so the
        # registry must not try to pre-check names at registration time.
        return []
