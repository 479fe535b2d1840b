"""Which replicas the client should be connected to now: configured targets plus the
current addresses of its dns:/// names.

`Membership.refresh()` resolves every dns:/// endpoint (on a worker thread: the system
resolver blocks) and returns what changed since the last call; the client adds the new
targets to its balancer and retires the vanished ones. A name that fails to resolve,
or resolves to nothing, keeps its previous addresses: a DNS hiccup must not take every
replica away from a running trainer (a replica that really died fails over anyway).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from trainer.client.resolve import DnsTarget, Resolver, parse_dns_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """The outcome of one refresh.

    Attributes:
        added: new target -> the authority ("name:port") it answers to, or None for a
            configured (not resolved) target.
        removed: targets no longer listed.
        errors: dns:/// endpoint -> why it did not resolve this time.
    """

    added: dict[str, str | None] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    errors: dict[str, str] = field(default_factory=dict)


class Membership:
    """The set of targets the client should hold connections to (see the module doc)."""

    def __init__(self, endpoints: Iterable[str], resolver: Resolver) -> None:
        self._resolver = resolver
        self._static: list[str] = []
        self._names: dict[str, DnsTarget] = {}  # configured endpoint -> name to resolve
        for endpoint in endpoints:
            dns = parse_dns_target(endpoint)
            if dns is None:
                self._static.append(endpoint)
            else:
                self._names[endpoint] = dns
        self._addresses: dict[str, list[str]] = {e: [] for e in self._names}  # targets
        self._current: set[str] = set()
        self._lock: asyncio.Lock | None = None  # made on the loop that uses it

    @property
    def resolves(self) -> bool:
        """Whether any endpoint is a dns:/// name (worth re-resolving periodically)."""
        return bool(self._names)

    @property
    def current(self) -> frozenset[str]:
        return frozenset(self._current)

    async def refresh(self) -> Change:
        """Resolves the dns:/// endpoints and returns what changed since the last call."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # the periodic refresh and connect() may overlap
            errors: dict[str, str] = {}
            authority: dict[str, str | None] = {t: None for t in self._static}
            for endpoint, dns in self._names.items():
                try:
                    addresses = await asyncio.to_thread(self._resolver, dns.host)
                    targets = [dns.address_target(a) for a in addresses]
                except (OSError, ValueError) as error:
                    targets, errors[endpoint] = [], f"{type(error).__name__}: {error}"
                if targets:
                    self._addresses[endpoint] = targets
                elif endpoint not in errors:
                    errors[endpoint] = "resolved to no address"
                if errors.get(endpoint) and self._addresses[endpoint]:
                    log.warning(
                        "%s: %s; keeping its %d known replicas",
                        endpoint,
                        errors[endpoint],
                        len(self._addresses[endpoint]),
                    )
                for target in self._addresses[endpoint]:
                    authority.setdefault(target, dns.authority)
            wanted = set(authority)
            added = {t: authority[t] for t in authority if t not in self._current}
            removed = tuple(sorted(self._current - wanted))
            self._current = wanted
            if self._names and (added or removed):
                log.info(
                    "teacher replicas: %d (+%s, -%s)",
                    len(wanted),
                    ",".join(added) or "none",
                    ",".join(removed) or "none",
                )
            return Change(added, removed, errors)
