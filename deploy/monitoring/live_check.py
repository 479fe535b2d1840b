"""Live monitoring check: the real teacher service scraped by a real Prometheus, on loopback.

    .venv/bin/python deploy/monitoring/live_check.py [--timeout-s 180] [--prometheus PATH]

What it does, bounded in time, cleaning up every process it starts:
1. builds a small random model and starts the teacher service on 127.0.0.1 (free ports);
2. starts Prometheus (Debian package) with a generated config that scrapes the service
   every second as job "teacher-metrics" and loads rules/hybrid-distill.rules.yaml, with
   TeacherDown's and TeacherUnavailable's `for:` shortened so they can fire in seconds;
3. drives traffic from two clients (Score and ScoreStream) through the generated stubs;
4. asserts through Prometheus's HTTP query API that the series exist, that the scored
   token counter equals the rows the clients received, that the rates are positive, and
   that both client ids appear in the per-client counter, with no alert firing; runs
   every dashboard query (the key panels must show data) and prometheus-adapter's
   expanded query for the HPA;
5. sends SIGTERM (the service must drain and exit 0) and waits for TeacherDown and
   TeacherUnavailable to fire.
Exit status 0 and a final "live check passed" line on success; 1 with the reason otherwise.
tests/deploy/test_live_prometheus.py runs it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

# render_prometheusrule is a sibling script (deploy/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from render_prometheusrule import load_rules

from teacher_service.random_model import save_random_model
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc

log = logging.getLogger("live_check")

JOB = "teacher-metrics"
HERE = Path(__file__).resolve().parent
DASHBOARD_FILE = HERE / "dashboards" / "hybrid-distill.json"
ADAPTER_DOC = HERE / "prometheus-adapter.md"
NAMESPACE = "live-check"  # the label a ServiceMonitor would attach
# Dashboard panels that must show data once traffic has flowed (the error panels may
# rightly stay empty, and GPU memory has no series on CPU).
PANELS_WITH_DATA = (
    "Ready replicas",
    "Scored tokens/s",
    "Throughput",
    "Request latency quantiles",
    "Queue depth",
    "Queue wait and compute time",
    "Batch size",
    "Tokens per client",
)


VOCAB = 256
# Short `for:` so the stop-the-service step sees the alerts fire within seconds.
FOR_OVERRIDES = {"TeacherDown": "3s", "TeacherUnavailable": "3s"}
# Series the traffic must create (names as exposed; histograms through _count).
EXPECTED_SERIES = (
    "teacher_service_requests_total",
    "teacher_service_request_latency_seconds_count",
    "teacher_service_tokens_scored_total",
    "teacher_service_client_tokens_total",
    "teacher_service_batch_size_count",
    "teacher_service_batch_tokens_count",
    "teacher_service_queue_depth",
    "teacher_service_queued_tokens",
    "teacher_service_queue_wait_seconds_count",
    "teacher_service_compute_seconds_count",
    "teacher_service_inflight_streams",
    "teacher_service_ready",
    "teacher_service_teacher_info",
)


class CheckFailed(Exception):
    """A live assertion failed; the message says which and what was seen."""


@dataclass
class Traffic:
    """What the clients sent and got back."""

    rows_by_client: dict[str, int] = field(default_factory=dict)
    requests: int = 0

    @property
    def rows(self) -> int:
        return sum(self.rows_by_client.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float, every_s: float = 0.5):
    """Poll until predicate() is truthy; return its value or raise CheckFailed."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, CheckFailed, KeyError, ValueError) as exc:
            last_error = exc
        time.sleep(every_s)
    raise CheckFailed(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last_error})")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- processes --------------------------------------------------------------------------


@contextlib.contextmanager
def process(name: str, cmd: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """A child process with output to log_path; terminated (then killed) on exit."""
    log.info("starting %s: %s", name, " ".join(cmd))
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            log.info("%s exited with %s", name, proc.returncode)


def teacher_command(model_dir: Path, grpc_port: int, http_port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "teacher_service",
        "--model",
        f"live={model_dir}",
        "--host",
        "127.0.0.1",
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--max-top-k",
        "8",
        "--grace-seconds",
        "3",
    ]


def write_prometheus_config(workdir: Path, http_port: int) -> Path:
    """prometheus.yml scraping the service every second, with our rules loaded."""
    rules_path = workdir / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(load_rules(for_overrides=FOR_OVERRIDES)))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules_path)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{http_port}"],
                        # What the Operator's ServiceMonitor would attach in a cluster.
                        "labels": {"namespace": NAMESPACE, "pod": "teacher-0"},
                    }
                ],
            }
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- traffic ----------------------------------------------------------------------------


def score_request(rng: random.Random, request_id: str) -> tuple[pb.ScoreRequest, int]:
    """A random sequence; returns the request and the rows (response tokens) it asks for."""
    length = rng.randint(4, 48)
    start = rng.randint(1, length - 1)
    ids = np.array([rng.randrange(4, VOCAB) for _ in range(length)], dtype="<i4")
    request = pb.ScoreRequest(
        request_id=request_id,
        token_ids=pb.Tensor(dtype=pb.DTYPE_INT32, shape=[length], data=ids.tobytes()),
        start=start,
        top_k=rng.randint(1, 8),
    )
    return request, length - start


def rows_of(response: pb.ScoreResponse) -> int:
    return int(response.token_logprobs.shape[0])


def drive_traffic(address: str, duration_s: float, seed: int) -> Traffic:
    """Two clients, one calling Score and one ScoreStream, for duration_s seconds."""
    traffic = Traffic()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def unary(client: str) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.TeacherServiceStub(channel)
            stop = time.monotonic() + duration_s
            while time.monotonic() < stop:
                request, expected = score_request(rng, f"{client}-{traffic.requests}")
                response = stub.Score(request, metadata=[("x-client-id", client)], timeout=30)
                if rows_of(response) != expected:
                    raise CheckFailed(f"Score returned {rows_of(response)} rows, not {expected}")
                with lock:
                    traffic.rows_by_client[client] = (
                        traffic.rows_by_client.get(client, 0) + expected
                    )
                    traffic.requests += 1

    def streaming(client: str) -> None:
        rng = random.Random(seed + 1)
        expected: dict[str, int] = {}

        def requests() -> Iterator[pb.ScoreRequest]:
            stop = time.monotonic() + duration_s
            i = 0
            while time.monotonic() < stop:
                for _ in range(8):  # small bursts so batches hold several sequences
                    request, rows = score_request(rng, f"{client}-{i}")
                    expected[request.request_id] = rows
                    i += 1
                    yield request
                time.sleep(0.05)

        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.TeacherServiceStub(channel)
            call = stub.ScoreStream(requests(), metadata=[("x-client-id", client)], timeout=60)
            for message in call:
                if message.WhichOneof("outcome") != "result":
                    raise CheckFailed(f"stream error: {message.error.message}")
                rows = rows_of(message.result)
                if rows != expected[message.request_id]:
                    raise CheckFailed(f"ScoreStream {message.request_id}: {rows} rows")
                with lock:
                    traffic.rows_by_client[client] = traffic.rows_by_client.get(client, 0) + rows
                    traffic.requests += 1

    def guarded(fn: Callable[[str], None], client: str) -> None:
        try:
            fn(client)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(unary, "live-unary")),
        threading.Thread(target=guarded, args=(streaming, "live-stream")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration_s + 60)
    if errors:
        raise CheckFailed(f"traffic failed: {errors[0]!r}")
    if any(t.is_alive() for t in threads):
        raise CheckFailed("traffic threads did not finish")
    log.info(
        "sent %d requests, %d rows: %s", traffic.requests, traffic.rows, traffic.rows_by_client
    )
    return traffic


# --- Prometheus queries -----------------------------------------------------------------


class PromAPI:
    """The few calls of Prometheus's HTTP API the check needs."""

    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        status, body = http_get(url)
        data = json.loads(body)
        if status != 200 or data.get("status") != "success":
            raise CheckFailed(f"query {expr!r} failed: {body[:300]}")
        return data["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def firing(self) -> set[str]:
        status, body = http_get(f"{self.base}/api/v1/alerts")
        if status != 200:
            raise CheckFailed(f"/api/v1/alerts answered {status}")
        alerts = json.loads(body)["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


def check_series(prom: PromAPI, traffic: Traffic) -> None:
    """Every expected series exists; counters match what the clients saw; rates > 0."""
    sel = f'{{job="{JOB}"}}'
    for name in EXPECTED_SERIES:
        wait_for(f"series {name}", lambda n=name: prom.query(f"{n}{sel}"), timeout_s=15)
    scored = wait_for(
        f"tokens_scored_total == {traffic.rows}",
        lambda: prom.scalar(f"sum(teacher_service_tokens_scored_total{sel})") == traffic.rows,
        timeout_s=15,
    )
    assert scored
    for client, rows in traffic.rows_by_client.items():
        expr = f'sum(teacher_service_client_tokens_total{{job="{JOB}", client="{client}"}})'
        wait_for(f"{client} tokens == {rows}", lambda e=expr, r=rows: prom.scalar(e) == r, 15)
    positive = {
        "token rate": f"sum(rate(teacher_service_tokens_scored_total{sel}[30s]))",
        "OK request rate": (
            f'sum(rate(teacher_service_requests_total{{job="{JOB}", code="OK"}}[30s]))'
        ),
        "batch rate": f"sum(rate(teacher_service_batch_size_count{sel}[30s]))",
        "p99 latency": (
            "histogram_quantile(0.99, sum by (le) "
            f"(rate(teacher_service_request_latency_seconds_bucket{sel}[30s])))"
        ),
    }
    for what, expr in positive.items():
        value = prom.scalar(expr)
        if not value or value <= 0:
            raise CheckFailed(f"{what} is {value} ({expr})")
        log.info("%s = %.4g", what, value)
    if prom.scalar(f"teacher_service_ready{sel}") != 1:
        raise CheckFailed("teacher_service_ready is not 1 while serving")
    firing = prom.firing()
    if firing:
        raise CheckFailed(f"alerts firing on a healthy service: {sorted(firing)}")


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in for this check."""
    return expr.replace("$__rate_interval", "30s").replace("$namespace", NAMESPACE)


def check_dashboard_queries(prom: PromAPI) -> None:
    """Every dashboard query runs on the live data; the key panels are not empty."""
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    with_data: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if prom.query(grafana_to_promql(target["expr"])):  # raises on a query error
                with_data.add(panel["title"])
    missing = sorted(set(PANELS_WITH_DATA) - with_data)
    if missing:
        raise CheckFailed(f"dashboard panels without data after traffic: {missing}")
    log.info("dashboard: %d panels show data", len(with_data))


def check_adapter_query(prom: PromAPI) -> None:
    """prometheus-adapter's metricsQuery, expanded as for an HPA request, finds the pod."""
    block = ADAPTER_DOC.read_text().split("```yaml\n", 1)[1].split("```", 1)[0]
    rule = yaml.safe_load(block)["custom"][0]
    expr = (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["name"]["as"])
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"teacher-0"')
        .replace("<<.GroupBy>>", "pod")
    )
    result = prom.query(expr)
    if [r["metric"].get("pod") for r in result] != ["teacher-0"]:
        raise CheckFailed(f"adapter query {expr!r} returned {result}")


# --- main -------------------------------------------------------------------------------


def run_check(workdir: Path, prometheus: str, timeout_s: float, traffic_s: float) -> None:
    started = time.monotonic()
    model_dir = save_random_model(workdir / "model", VOCAB, hidden=32, layers=1, heads=2, seed=7)
    grpc_port, http_port, prom_port = free_port(), free_port(), free_port()
    config_path = write_prometheus_config(workdir, http_port)
    promtool = shutil.which("promtool")
    if promtool:
        proc = subprocess.run([promtool, "check", "config", str(config_path)], capture_output=True)
        if proc.returncode != 0:
            raise CheckFailed(f"promtool check config: {proc.stdout!r} {proc.stderr!r}")

    teacher_cmd = teacher_command(model_dir, grpc_port, http_port)
    prom_cmd = [
        prometheus,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        "--storage.tsdb.retention.time=1h",
    ]
    remaining = lambda: max(5.0, timeout_s - (time.monotonic() - started))
    with (
        process("teacher", teacher_cmd, workdir / "teacher.log") as teacher,
        process("prometheus", prom_cmd, workdir / "prometheus.log") as prom_proc,
    ):
        readyz = f"http://127.0.0.1:{http_port}/readyz"
        wait_for("teacher /readyz", lambda: http_get(readyz)[0] == 200, min(120, remaining()))
        prom = PromAPI(f"http://127.0.0.1:{prom_port}")
        wait_for("prometheus ready", lambda: http_get(f"{prom.base}/-/ready")[0] == 200, 60)
        wait_for("target up", lambda: prom.scalar(f'up{{job="{JOB}"}}') == 1, 30)

        traffic = drive_traffic(f"127.0.0.1:{grpc_port}", traffic_s, seed=random.randrange(2**31))
        check_series(prom, traffic)
        check_dashboard_queries(prom)
        check_adapter_query(prom)

        log.info("stopping the teacher with SIGTERM")
        teacher.send_signal(signal.SIGTERM)
        code = teacher.wait(timeout=30)
        if code != 0:
            raise CheckFailed(f"teacher exited {code} after SIGTERM, expected a clean drain (0)")
        wanted = set(FOR_OVERRIDES)
        wait_for(f"alerts {sorted(wanted)} firing", lambda: wanted <= prom.firing(), 45)
        log.info("alerts firing: %s", sorted(prom.firing()))
        if prom_proc.poll() is not None:
            raise CheckFailed("prometheus died during the check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default=shutil.which("prometheus"))
    parser.add_argument("--timeout-s", type=float, default=180.0, help="overall bound")
    parser.add_argument("--traffic-s", type=float, default=4.0, help="seconds of traffic")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs/data in this dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.prometheus:
        log.error("prometheus not found: apt-get install prometheus (tools/setup_ops_tools.sh)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="live-check-")) if args.keep is None else args.keep
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run_check(workdir, args.prometheus, args.timeout_s, args.traffic_s)
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        log.error("live check FAILED: %s", exc)
        for name in ("teacher.log", "prometheus.log"):
            path = workdir / name
            if path.exists():
                tail = path.read_text()[-3000:]
                log.error("--- last lines of %s ---\n%s", name, tail)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("live check passed")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
