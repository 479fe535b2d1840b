"""Client-side balancing across teacher replicas: least outstanding work, with cool-downs.

Each request attempt takes a slot on one endpoint, weighted by its tokens (the length
of the sequence: a replica's work grows with it), and gives both back when the attempt
ends. The policy:
1. Never an endpoint disabled by the handshake (it serves a different model) or
   removed because its address left DNS.
2. While any endpoint is up (not cooling down after a failure), use only those: the
   one with the fewest tokens in flight below its capacity (then the fewest attempts),
   ties taken in turn from a random start, so that many clients do not all pile onto
   the first replica in their lists and one client's picks among idle replicas
   alternate instead of drifting by chance; when they are all full, wait for a slot
   rather than spill onto a failed one. Tokens, not request counts: ten short
   sequences are less work than ten long ones, and a replica that is slower (busier,
   smaller GPU) keeps more tokens outstanding and so gets fewer new ones.
3. Avoid the endpoint that just failed this request when any other one qualifies.
4. When every endpoint is cooling down, take the one whose cool-down ends first: the
   caller's backoff paces the retries, and a replica that came back is found at once.
5. Capacity is `max_in_flight`, but only one probe attempt for an endpoint that failed
   and has not succeeded since, so that a replica that died is not handed a whole
   burst of requests the moment its cool-down ends.

A failure puts an endpoint into a cool-down of backoff length that doubles with
consecutive failures; a success clears it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class Endpoint:
    """One replica's balancing state (mutated only on the client's event loop)."""

    target: str
    in_flight: int = 0  # attempts
    tokens: int = 0  # tokens of the attempts in flight
    failures: int = 0  # consecutive
    down_until: float = 0.0  # monotonic seconds
    disabled: str | None = None  # why the handshake excluded it
    verified: bool = False  # Info checked against the expectations
    removed: bool = False  # its address left DNS: attempts holding it go elsewhere


class Balancer:
    """Chooses the endpoint for each attempt (see the module docstring)."""

    def __init__(
        self,
        targets: Iterable[str],
        max_in_flight: int,
        *,
        cooldown_base_s: float = 0.05,
        cooldown_max_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoints = {t: Endpoint(t) for t in targets}
        self._max = max_in_flight
        self._base = cooldown_base_s
        self._cap = cooldown_max_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._last_pick: str | None = None  # where the turn among tied endpoints is
        self._freed: asyncio.Event | None = None  # made on the loop that uses it

    # -- policy (pure: no waiting) -----------------------------------------------------

    def pick(self, avoid: str | None = None) -> Endpoint | None:
        """The endpoint for the next attempt, or None when the attempt must wait.

        Raises LookupError when every endpoint is disabled.
        """
        if not self.endpoints:  # DNS lists no replica right now: wait for one
            return None
        usable = [e for e in self.endpoints.values() if e.disabled is None]
        if not usable:
            reasons = "; ".join(f"{e.target}: {e.disabled}" for e in self.endpoints.values())
            raise LookupError(f"every teacher endpoint is excluded ({reasons})")
        now = self._clock()
        up = [e for e in usable if e.down_until <= now]
        if up:
            # Full live replicas make the attempt wait rather than spill onto one that
            # just failed: a dead replica would burn the request's retries in a loop.
            open_ = [e for e in up if e.in_flight < self.capacity(e)]
            if not open_:
                return None
            pool = [e for e in open_ if e.target != avoid] or open_
            least = min((e.tokens, e.in_flight) for e in pool)
            return self._next_in_turn([e for e in pool if (e.tokens, e.in_flight) == least])
        open_ = [e for e in usable if e.in_flight < self.capacity(e)]
        if not open_:
            return None
        pool = [e for e in open_ if e.target != avoid] or open_
        return min(pool, key=lambda e: e.down_until)

    def _next_in_turn(self, tied: list[Endpoint]) -> Endpoint:
        """The first tied endpoint after the last pick (by target), from a random start."""
        if self._last_pick is None:
            chosen = self._rng.choice(tied)
        else:
            ordered = sorted(tied, key=lambda e: e.target)
            after = [e for e in ordered if e.target > self._last_pick]
            chosen = after[0] if after else ordered[0]
        self._last_pick = chosen.target
        return chosen

    def capacity(self, endpoint: Endpoint) -> int:
        """Slots an endpoint may use: one probe while it has not succeeded since failing."""
        return 1 if endpoint.failures else self._max

    def has_other_up(self, target: str) -> bool:
        """Whether some usable endpoint other than `target` is not cooling down."""
        now = self._clock()
        return any(
            e.target != target and e.disabled is None and e.down_until <= now
            for e in self.endpoints.values()
        )

    # -- slots ---------------------------------------------------------------------------

    async def acquire(self, avoid: str | None = None, tokens: int = 1) -> Endpoint:
        """Takes a slot (and `tokens` of outstanding work) on the chosen endpoint,
        waiting while all are full.

        Raises LookupError when every endpoint is disabled.
        """
        if self._freed is None:
            self._freed = asyncio.Event()
        # No await between a failed pick and clear(), so no release can slip in between
        # and be missed; every waiter re-checks after a wake-up.
        while (endpoint := self.pick(avoid)) is None:
            self._freed.clear()
            await self._freed.wait()
        endpoint.in_flight += 1
        endpoint.tokens += tokens
        return endpoint

    def release(self, endpoint: Endpoint, tokens: int = 1) -> None:
        """Gives back what `acquire` took (the same `tokens`) and wakes the waiters."""
        endpoint.in_flight -= 1
        endpoint.tokens -= tokens
        self._wake()

    def _wake(self) -> None:
        if self._freed is not None:
            self._freed.set()

    # -- membership (re-resolution) ------------------------------------------------------

    def add(self, target: str) -> Endpoint:
        """A new endpoint (unverified: its handshake runs before its first request)."""
        endpoint = self.endpoints.get(target)
        if endpoint is None:
            endpoint = self.endpoints[target] = Endpoint(target)
            self._wake()  # a waiter may now have a free slot
        return endpoint

    def remove(self, target: str) -> Endpoint | None:
        """Stops picking `target`; attempts holding it still release it normally."""
        endpoint = self.endpoints.pop(target, None)
        if endpoint is not None:
            endpoint.removed = True
            self._wake()  # waiters re-check (e.g. every endpoint may now be disabled)
        return endpoint

    # -- health --------------------------------------------------------------------------

    def mark_failed(self, target: str, at_least_s: float = 0.0) -> None:
        """Starts (or lengthens) a cool-down after a connection failure or drain."""
        endpoint = self.endpoints.get(target)
        if endpoint is None:  # removed meanwhile: nothing to cool down
            return
        endpoint.failures += 1
        cooldown = min(self._cap, self._base * 2.0 ** min(endpoint.failures - 1, 60))
        endpoint.down_until = self._clock() + max(cooldown, at_least_s)

    def mark_ok(self, target: str) -> None:
        endpoint = self.endpoints.get(target)
        if endpoint is None:
            return
        endpoint.failures = 0
        endpoint.down_until = 0.0

    def disable(self, target: str, reason: str) -> None:
        """Excludes an endpoint for good and wakes waiters (they may now have to fail)."""
        endpoint = self.endpoints.get(target)
        if endpoint is not None:
            endpoint.disabled = reason
        self._wake()
