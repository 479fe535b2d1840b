"""tools/deploy_kind.py: the newcomer's path, checked without a cluster.

`--dry-run` must print every command in order and validate every manifest it would
apply; the images it builds and loads must be the ones the manifests run; a broken
manifest must stop it; the final check must really tell a teacher that scored tokens
from one that did not (run here against a real HTTP /metrics).
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import random
import re
import shutil
import subprocess
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.deploy import ops

SCRIPT = ops.ROOT / "tools" / "deploy_kind.py"


def _module():
    spec = importlib.util.spec_from_file_location("deploy_kind", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    ops.require("kubectl")
    ops.require("kubernetes-validate")
    return ops.run([sys.executable, SCRIPT, "--dry-run", *args], timeout=180)


@pytest.fixture(scope="module")
def dry_run_output() -> str:
    proc = _dry_run()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    return proc.stdout


def test_dry_run_prints_every_step_in_order(dry_run_output):
    commands = re.findall(r"^\$ (.+)$", dry_run_output, flags=re.M)
    expected = [
        r"docker build -f deploy/docker/teacher-cpu\.Dockerfile -t hybrid-distill/teacher-cpu:",
        r"docker build -f deploy/docker/trainer\.Dockerfile --build-arg TORCH_INDEX_URL=\S+/cpu ",
        r"kind create cluster --name hybrid-distill",
        r"kind load docker-image hybrid-distill/teacher-cpu:\S+ hybrid-distill/trainer:",
        r"kubectl --context kind-hybrid-distill apply -f - <<EOF",  # namespace
        r"kubectl --context kind-hybrid-distill apply -f - <<EOF",  # Secret
        r"kubectl --context kind-hybrid-distill apply -f - <<EOF",  # cpu-dev overlay
        r"kubectl .* rollout status deployment/teacher",
        r"kubectl .* wait --for=condition=complete job/trainer",
        r"kubectl .* logs --selector=app.kubernetes.io/component=trainer",
        r"kubectl .* exec deployment/teacher -- python -c",
    ]
    assert len(commands) == len(expected), commands
    for command, pattern in zip(commands, expected, strict=True):
        assert re.match(pattern, command), (pattern, command)
    assert re.search(r"kubernetes-validate --strict .*: \d+ objects valid", dry_run_output)
    assert dry_run_output.rstrip().endswith("nothing was executed")


def test_dry_run_never_prints_the_token(dry_run_output):
    secret = dry_run_output.split("teacher-auth Secret", 1)[1].split("\n## ", 1)[0]
    assert "token: <random token>" in secret
    assert not re.search(r"token: [A-Za-z0-9+/=]{40,}", dry_run_output)


def test_applied_manifests_are_the_overlay_and_use_the_images_built(tmp_path):
    """What is applied is the rendered cpu-dev overlay (plus namespace and Secret), and
    every image its pods run is one the script builds and loads into the node."""
    module = _module()
    token = f"{random.getrandbits(128):032x}"
    plan = module.steps("kind", "c", module.OVERLAY, token)
    applied = [s for s in plan if s.manifest]
    docs = [d for s in applied for d in ops.documents(s.manifest)]
    assert [d["kind"] for d in docs[:2]] == ["Namespace", "Secret"]
    assert ops.documents(applied[2].manifest) == ops.documents(ops.render_overlay("cpu-dev"))
    namespaces = {d["metadata"].get("namespace") for d in docs[1:]}
    assert namespaces == {docs[0]["metadata"]["name"]}
    assert base64.b64decode(docs[1]["data"]["token"]).decode() == token
    built = {s.argv[s.argv.index("-t") + 1] for s in plan if s.argv[:2] == ("docker", "build")}
    load = next(s for s in plan if s.argv[:2] == ("kind", "load"))
    used = {
        c["image"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
        for c in ops.pod_containers(d["spec"]["template"]["spec"])
    }
    assert used == built and used <= set(load.argv)
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            for c in ops.pod_containers(d["spec"]["template"]["spec"]):
                assert c["imagePullPolicy"] == "IfNotPresent"  # loaded, never pulled


def test_dry_run_stops_on_an_invalid_manifest(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(ops.K8S, copy)
    patch = copy / "overlays" / "cpu-dev" / "teacher-cpu.yaml"
    field = f"bogusField{random.randrange(1000)}"
    patch.write_text(
        patch.read_text().replace(
            "      nodeSelector: null\n", f"      nodeSelector: null\n      {field}: 1\n"
        )
    )
    proc = _dry_run("--overlay", str(copy / "overlays" / "cpu-dev"))
    assert proc.returncode != 0
    assert "validation failed" in proc.stderr and field in proc.stderr + proc.stdout


def test_teardown_dry_run():
    proc = _dry_run("--teardown")
    assert proc.returncode == 0, proc.stderr
    assert re.findall(r"^\$ (.+)$", proc.stdout, flags=re.M) == [
        "kind delete cluster --name hybrid-distill"
    ]


@pytest.mark.parametrize("scored", [0, 1])
def test_final_check_reads_the_teachers_scored_tokens(scored):
    """The in-pod check script against a real HTTP /metrics of the teacher's registry:
    exit 0 once tokens were scored, 1 before."""
    from teacher_service.metrics import Metrics

    metrics = Metrics(CollectorRegistry())
    tokens = random.randint(1, 10**6) * scored
    if tokens:
        metrics.tokens_scored.labels(teacher="teacher").inc(tokens)
    body = generate_latest(metrics.registry)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = _module()._CHECK_SCORED.replace(
            "127.0.0.1:8000", f"127.0.0.1:{server.server_address[1]}"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
        )
    finally:
        server.shutdown()
    assert proc.returncode == (0 if tokens else 1), proc.stderr
    assert f"teacher scored {tokens} tokens" in proc.stdout
