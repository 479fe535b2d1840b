"""Load spread across replicas: the client resolves a dns:/// name to every replica,
balances by tokens in flight, re-resolves while running, and loses no request when a
replica leaves DNS or dies.

The end-to-end test runs real server processes bound to 127.0.0.1..4 (all of 127/8 is
loopback on Linux) on one shared port, as the pods behind a headless Service would be,
and twelve clients resolving one name through a resolver backed by a list the test
edits (no /etc/hosts). Tokens served are read from each server's own /metrics.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import random
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from tests.pki import make_pki
from tests.trainer.client_fixtures import (  # noqa: F401
    ReferenceModel,
    ServerProcess,
    assert_matches_reference,
    model_dir,
    random_specs,
    thread_server,
)
from trainer.client import (
    AsyncTeacherClient,
    ClientConfig,
    ScoreSpec,
    TeacherClient,
    TeacherScores,
    TeacherUnavailableError,
    TlsOptions,
)
from trainer.client.balance import Balancer
from trainer.client.replicas import Membership
from trainer.client.resolve import getaddrinfo_resolver, parse_dns_target

NAME = "teachers.test"
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
CONNECTION_AGE_S = 3.0
CLIENTS = 12
WINDOW = 4  # requests one client has in flight at most
THINK_S = 0.08  # mean pause between one client's submissions


class ListResolver:
    """A DNS stand-in: `name` resolves to whatever `addresses` holds at call time."""

    def __init__(self, name: str, addresses: Sequence[str]) -> None:
        self.name = name
        self._addresses = list(addresses)
        self._lock = threading.Lock()  # called from the clients' resolver threads

    def set(self, addresses: Sequence[str]) -> None:
        with self._lock:
            self._addresses = list(addresses)

    def __call__(self, host: str) -> list[str]:
        if host != self.name:
            raise socket.gaierror(socket.EAI_NONAME, f"unknown name {host}")
        with self._lock:
            return list(self._addresses)


# -- units: resolution, membership, balancing by tokens --------------------------------


def test_default_resolver_returns_every_address_getaddrinfo_gives() -> None:
    expected = {info[4][0] for info in socket.getaddrinfo("localhost", None)}
    got = getaddrinfo_resolver("localhost")
    assert set(got) == expected and len(got) == len(expected)
    with pytest.raises(OSError):
        getaddrinfo_resolver("no-such-host.invalid")


def test_membership_resolves_names_and_keeps_them_through_dns_failures() -> None:
    port = random.randint(1, 65535)
    resolver = ListResolver(NAME, ["10.0.0.1", "10.0.0.2", "fd00::3"])
    members = Membership((f"dns:///{NAME}:{port}", "static:7"), resolver)

    async def run() -> list:
        changes = [await members.refresh()]
        resolver.set(["10.0.0.2", "10.0.0.4"])
        changes.append(await members.refresh())
        resolver.set([])  # a DNS hiccup: keep what was known
        changes.append(await members.refresh())
        resolver.name = "other"  # NXDOMAIN: same
        changes.append(await members.refresh())
        return changes

    first, second, empty, missing = asyncio.run(run())
    assert first.added == {
        "static:7": None,
        f"10.0.0.1:{port}": f"{NAME}:{port}",
        f"10.0.0.2:{port}": f"{NAME}:{port}",
        f"[fd00::3]:{port}": f"{NAME}:{port}",
    }
    assert set(second.added) == {f"10.0.0.4:{port}"}
    assert second.removed == (f"10.0.0.1:{port}", f"[fd00::3]:{port}")
    for change in (empty, missing):
        assert not change.added and not change.removed
        assert list(change.errors) == [f"dns:///{NAME}:{port}"]
    assert members.current == {"static:7", f"10.0.0.2:{port}", f"10.0.0.4:{port}"}


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("dns://8.8.8.8/teacher:50051", "names a DNS server"),
        ("dns:///teacher", "must be dns:///host:port"),
        ("dns:///teacher:0", "must be dns:///host:port"),
        ("dns:///:50051", "must be dns:///host:port"),
    ],
)
def test_malformed_dns_endpoints_are_refused_naming_the_field(endpoint: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"ClientConfig.endpoints: .*{message}"):
        ClientConfig(endpoints=(endpoint,))
    assert parse_dns_target("127.0.0.1:5") is None
    assert parse_dns_target("dns:///[::1]:5") is not None


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_resolve_interval_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="resolve_interval_s must be finite and > 0"):
        ClientConfig(endpoints=("h:1",), resolve_interval_s=interval)


def test_balancer_weighs_tokens_in_flight_not_request_count(seed: int) -> None:
    rng = random.Random(seed)
    balancer = Balancer(["a:1", "b:1"], max_in_flight=64, rng=rng)
    a, b = balancer.endpoints["a:1"], balancer.endpoints["b:1"]
    # a carries one long sequence, b several short ones with fewer tokens in all.
    long_len = rng.randint(200, 500)
    a.in_flight, a.tokens = 1, long_len
    b.in_flight = rng.randint(2, 8)
    b.tokens = rng.randint(b.in_flight, long_len - 1)
    assert all(balancer.pick().target == "b:1" for _ in range(20))
    b.tokens = long_len + 1
    assert all(balancer.pick().target == "a:1" for _ in range(20))

    async def acquire_release() -> tuple[int, int]:
        endpoint = await balancer.acquire(tokens=37)
        held = endpoint.tokens
        balancer.release(endpoint, tokens=37)
        return held, endpoint.tokens

    held, after = asyncio.run(acquire_release())
    assert (held, after) == (long_len + 37, long_len)


def test_idle_endpoints_are_taken_in_turn(seed: int) -> None:
    targets = [f"h{i}:1" for i in range(random.Random(seed).randint(2, 6))]
    balancer = Balancer(targets, max_in_flight=4, rng=random.Random(seed))
    picks = [balancer.pick().target for _ in range(10 * len(targets))]
    counts = collections.Counter(picks)
    assert set(counts.values()) == {10}, counts  # exactly even, not even by chance
    assert len(set(picks[: len(targets)])) == len(targets)


def test_removed_endpoint_is_not_picked_and_an_added_one_is(seed: int) -> None:
    balancer = Balancer(["a:1", "b:1"], max_in_flight=4, rng=random.Random(seed))
    removed = balancer.remove("a:1")
    assert removed is not None and removed.removed
    assert all(balancer.pick().target == "b:1" for _ in range(20))
    balancer.endpoints["b:1"].tokens = 10
    balancer.add("c:1")
    assert balancer.pick().target == "c:1"  # nothing in flight there yet
    balancer.remove("b:1")
    balancer.remove("c:1")
    assert balancer.pick() is None  # no replica listed: wait for the next resolution


@pytest.mark.parametrize("certified", [True, False], ids=["name-in-cert", "other-name"])
def test_tls_checks_the_resolved_name_not_the_address(
    model_dir: Path,  # noqa: F811
    tmp_path: Path,
    gen: torch.Generator,
    certified: bool,
) -> None:
    """Dialled by IP, a replica's certificate is checked against the DNS name."""
    pki = make_pki(tmp_path, server_name="teacher.internal")
    server = thread_server(model_dir, tls_cert=pki.server_cert, tls_key=pki.server_key)
    name = "teacher.internal" if certified else "impostor.internal"
    resolver = ListResolver(name, ["127.0.0.1"])
    config = ClientConfig(
        endpoints=(f"dns:///{name}:{server.grpc_port}",),
        tls=TlsOptions(ca_cert=pki.ca_cert),
        resolver=resolver,
        max_retries=1,
        backoff_max_s=0.1,
    )
    try:
        with TeacherClient(config) as client:
            if certified:
                spec = random_specs(gen, 1, max_len=24)[0]
                assert client.score_batch([spec])[0].endpoint == f"127.0.0.1:{server.grpc_port}"
            else:
                with pytest.raises(TeacherUnavailableError, match="no teacher endpoint answered"):
                    client.connect()
    finally:
        server.stop()


def test_stream_moves_to_a_new_connection_before_the_server_cuts_the_old_one(
    model_dir: Path,  # noqa: F811
    gen: torch.Generator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At GOAWAY (maximum connection age) the client retires its stream, so the end of
    the grace period finds nothing to cut: no stream is lost, no request retried."""
    server = thread_server(model_dir, max_connection_age_s=0.3, max_connection_age_grace_s=0.3)
    caplog.set_level(logging.INFO, logger="trainer.client")
    streams: list[object] = []  # kept alive, so that ids are not reused

    async def run() -> int:
        config = ClientConfig(endpoints=(server.address,), max_retries=0)
        async with AsyncTeacherClient(config) as client:
            await client.connect()
            scored = 0
            deadline = time.monotonic() + 2.5  # several ages and grace periods
            while time.monotonic() < deadline:
                specs = random_specs(gen, 4, max_len=24)
                scored += len(await client.score_batch(specs))
                streams.append(client._streams[server.address])
                await asyncio.sleep(0.02)
            return scored

    try:
        scored = asyncio.run(run())
    finally:
        server.stop()
    distinct = len({id(stream) for stream in streams})
    assert scored > 0 and distinct >= 2, "the stream never moved: nothing shown"
    cut = [r.getMessage() for r in caplog.records if "max connection age" in r.getMessage()]
    assert not cut, cut


# -- end to end: three replicas, a fourth added, one leaving DNS, one killed -------------


def _shared_ports(count: int) -> list[int]:
    """`count` ports free on every host of HOSTS (each replica binds its own address)."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind((HOSTS[0], 0))
        ports = [probe.getsockname()[1]]
        probe.close()
        while len(ports) < count:
            probe = socket.socket()
            probe.bind((HOSTS[0], 0))
            ports.append(probe.getsockname()[1])
            probe.close()
        held = []
        try:
            for host in HOSTS:
                for port in ports:
                    sock = socket.socket()
                    held.append(sock)
                    sock.bind((host, port))
            return ports
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no port free on every loopback address")


def _metric(host: str, http_port: int, series: str) -> float:
    """One sample from the replica's own /metrics (real HTTP), e.g. 'x_total{a="b"}'."""
    with urllib.request.urlopen(f"http://{host}:{http_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    if match is None:  # a labelled counter has no sample before its first increment
        family = series.split("{")[0]
        assert f"# TYPE {family} " in text, f"no {series} on {host}"
        return 0.0
    return float(match.group(1))


def _tokens_served(host: str, http_port: int) -> float:
    return _metric(host, http_port, 'teacher_service_tokens_scored_total{teacher="teacher"}')


def _open_streams(host: str, http_port: int) -> float:
    return _metric(host, http_port, "teacher_service_inflight_streams")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (for the diagnostics printed)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Load:
    """Twelve clients submitting random sequences until stopped, each at most WINDOW in
    flight and a random pause (mean THINK_S) between submissions, as rollout loops do.

    Paced rather than flat out: when every replica is saturated, each one's share is
    just its share of the CPU, whatever the client does; below saturation the share
    shows where the client sends work.
    """

    def __init__(self, clients: list[TeacherClient], seed: int) -> None:
        self.clients = clients
        self.results: dict[str, TeacherScores] = {}
        self.errors: list[BaseException] = []
        self.delivered: collections.Counter[str] = collections.Counter()
        self.specs: dict[str, ScoreSpec] = {}
        self._gens = [torch.Generator().manual_seed(seed + i) for i in range(len(clients))]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = [0] * len(clients)
        self._stop = threading.Event()
        self._driver = threading.Thread(target=self._drive, name="load", daemon=True)

    def start(self) -> None:
        self._driver.start()

    def _drive(self) -> None:
        due = [time.monotonic()] * len(self.clients)
        while not self._stop.is_set():
            now = time.monotonic()
            for index in range(len(self.clients)):
                with self._lock:
                    ready = now >= due[index] and self._in_flight[index] < WINDOW
                if ready:
                    self._submit(index)
                    due[index] = now + self._rng.expovariate(1 / THINK_S)
            self._stop.wait(0.002)

    def _submit(self, index: int) -> None:
        spec = random_specs(self._gens[index], 1, min_len=8, max_len=64, top_k=4)[0]
        request_id = f"c{index}-{spec.request_id}"  # unique across the clients
        spec = ScoreSpec(spec.token_ids, spec.start, spec.top_k, request_id=request_id)
        with self._lock:
            self.specs[spec.request_id] = spec
            self._in_flight[index] += 1
        future = self.clients[index].submit(spec)
        future.add_done_callback(lambda f, i=index, s=spec: self._done(i, s, f))

    def _done(self, index: int, spec: ScoreSpec, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._in_flight[index] -= 1
            if future.cancelled() or future.exception() is not None:
                self.errors.append(future.exception() or concurrent.futures.CancelledError())
            else:
                self.delivered[future.result().request_id] += 1
                self.results[spec.request_id] = future.result()
            self._idle.notify_all()

    def stop(self, timeout_s: float = 120) -> None:
        """Stops submitting and waits for every request in flight."""
        self._stop.set()
        if self._driver.is_alive():
            self._driver.join(timeout_s)
            assert not self._driver.is_alive(), "the load driver hung"
        with self._lock:
            assert self._idle.wait_for(lambda: sum(self._in_flight) == 0, timeout_s), (
                f"{sum(self._in_flight)} requests never finished"
            )


@contextlib.contextmanager
def _replicas(model: Path, ports: list[int]) -> Iterator[dict[str, ServerProcess]]:
    grpc_port, http_port = ports
    args = (
        "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--torch-threads", "1",
        "--max-batch-size", "4",
        "--max-connection-age-seconds", str(CONNECTION_AGE_S),
        "--max-connection-age-grace-seconds", str(CONNECTION_AGE_S),
    )  # fmt: skip
    # Started together (start-up is mostly imports); the fourth joins DNS later.
    procs = {host: ServerProcess(model, *args, "--host", host, timeout_s=600) for host in HOSTS}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.close()


def test_load_spreads_over_replicas_follows_dns_and_survives_a_kill(
    model_dir: Path,  # noqa: F811
    seed: int,
) -> None:
    grpc_port, http_port = ports = _shared_ports(2)
    resolver = ListResolver(NAME, HOSTS[:3])
    with _replicas(model_dir, ports) as procs:
        for host in HOSTS[:3]:
            procs[host].wait_ready()
        clients = [
            TeacherClient(
                ClientConfig(
                    endpoints=(f"dns:///{NAME}:{grpc_port}",),
                    client_id=f"trainer-{i}",
                    resolver=resolver,
                    resolve_interval_s=0.25,
                    deadline_s=120.0,
                    max_retries=20,
                    backoff_max_s=0.5,
                )
            )
            for i in range(CLIENTS)
        ]
        load = Load(clients, seed)
        try:
            for client in clients:
                client.connect()
            load.start()

            def served(hosts: Sequence[str]) -> dict[str, float]:
                return {h: _tokens_served(h, http_port) for h in hosts}

            # 1. Three replicas: each serves a third, give or take.
            time.sleep(1.0)  # every client past its first requests
            before = served(HOSTS[:3])
            cpu = {h: _cpu_seconds(procs[h].proc.pid) for h in HOSTS[:3]}
            time.sleep(2 * CONNECTION_AGE_S)  # spans connection ages: streams rotate
            after = served(HOSTS[:3])
            cpu = {h: round(_cpu_seconds(procs[h].proc.pid) - cpu[h], 2) for h in cpu}
            done = {h: after[h] - before[h] for h in before}
            total = sum(done.values())
            shares = {h: done[h] / total for h in done}
            # Shown with -s: replicas that got unequal CPU (a loaded host) serve unequally.
            print(f"token shares of three replicas: {shares}; CPU seconds: {cpu}")
            assert total > 0 and all(0.25 <= s <= 0.42 for s in shares.values()), shares

            # 2. A fourth replica joins DNS mid-run: it gets load without any restart.
            procs[HOSTS[3]].wait_ready()
            # A fresh process's first forwards are slow (lazy initialisation); a pod is
            # in DNS once ready, and the point here is the clients, not that warm-up.
            warm = ClientConfig(endpoints=(f"{HOSTS[3]}:{grpc_port}",), deadline_s=120.0)
            with TeacherClient(warm) as client:
                client.score_batch(random_specs(torch.Generator().manual_seed(seed), 8))
            before = served(HOSTS)
            resolver.set(HOSTS)
            time.sleep(2 * CONNECTION_AGE_S)
            after = served(HOSTS)
            done = {h: after[h] - before[h] for h in HOSTS}
            new_share = done[HOSTS[3]] / sum(done.values())
            print(f"share of the added replica in two connection ages: {new_share:.3f}")
            assert new_share >= 0.15, {h: d / sum(done.values()) for h, d in done.items()}

            # 3. A replica dies with requests in flight (SIGKILL), then leaves DNS.
            victim = f"{HOSTS[1]}:{grpc_port}"

            def in_flight_on_victim() -> int:
                return sum(
                    e.in_flight
                    for c in clients
                    if (e := c._client._balancer.endpoints.get(victim)) is not None
                )

            _wait_for(lambda: in_flight_on_victim() > 0, 30, "requests on the victim")
            procs[HOSTS[1]].kill(signal.SIGKILL)
            resolver.set([HOSTS[0], HOSTS[2], HOSTS[3]])

            # 4. A live replica leaves DNS: its requests finish, then every client
            #    closes its stream there (the server sees none open) while load goes on.
            #    Each client re-resolves on its own clock: until it has, the replica is
            #    still in its DNS answer and it may open a stream there (its old one can
            #    have just aged out, so "none open" alone does not mean everyone left).
            resolver.set([HOSTS[2], HOSTS[3]])
            leaver = f"{HOSTS[0]}:{grpc_port}"
            _wait_for(
                lambda: all(leaver not in c._client._balancer.endpoints for c in clients),
                30,
                "every client to drop 127.0.0.1",
            )
            _wait_for(
                lambda: _open_streams(HOSTS[0], http_port) == 0, 30, "streams to leave 127.0.0.1"
            )
            assert _open_streams(HOSTS[2], http_port) > 0
            leaving = _tokens_served(HOSTS[0], http_port)
            time.sleep(2 * 0.25)  # two resolutions later, still nothing sent there
            assert _tokens_served(HOSTS[0], http_port) == leaving
        finally:
            load.stop()
            for client in clients:
                client.close()
    # Nothing lost, nothing doubled, through rotations, the kill and the departure.
    assert not load.errors, load.errors[:3]
    assert set(load.delivered) == set(load.specs)
    assert max(load.delivered.values()) == 1
    sample = random.Random(seed).sample(sorted(load.specs), 24)
    reference = ReferenceModel(model_dir)
    rows = reference.rows_many([load.specs[r] for r in sample])
    for request_id, expected in zip(sample, rows, strict=True):
        assert_matches_reference(load.results[request_id], load.specs[request_id], expected)
