"""The cpu-dev overlay's pods, run here as processes: the trainer Job completes.

(This holds the check that the init containers build a teacher and a student with the
same tokenizer fingerprint and a readable prompts file.)

No cluster runs here, so this plays the kubelet for one teacher pod and one trainer
worker of the rendered cpu-dev overlay: it runs their init containers' commands, lays
out their volumes under a temporary directory (the teacher-auth Secret as a token
file), starts the teacher with the Deployment's own arguments expanded from its
ConfigMap, waits on the startup probe's endpoint, runs worker 0 of the Indexed Job with
the Job's own arguments and train.yaml, and checks the outcome as
tools/deploy_kind.py does: the worker exits 0 having written its checkpoints, and the
teacher's scored-token counter is above zero. What differs from a cluster is only the
plumbing: loopback ports instead of the pod network, the headless Service's DNS name
replaced by the teacher's loopback address, and a 4-step run instead of 20.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from teacher_service.fingerprint import tokenizer_fingerprint
from tests.deploy import ops

ROOT_PATHS = ("/models", "/checkpoints", "/etc/hybrid-distill/auth")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(text: str, root: Path) -> str:
    for path in ROOT_PATHS:
        text = text.replace(path, str(root / path.strip("/").replace("/", "_")))
    return text


def _get(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


@pytest.mark.timeout(600)
def test_cpu_dev_trainer_job_completes_against_the_cpu_dev_teacher(tmp_path):
    docs = ops.documents(ops.render_overlay("cpu-dev"))
    teacher_spec = ops.find(docs, "Deployment", "teacher")["spec"]["template"]["spec"]
    job = ops.find(docs, "Job", "trainer")["spec"]
    trainer_spec = job["template"]["spec"]
    for path in ROOT_PATHS:
        Path(_local(path, tmp_path)).mkdir(parents=True)
    token = f"{random.getrandbits(128):032x}"
    Path(_local("/etc/hybrid-distill/auth/token", tmp_path)).write_text(token + "\n")
    env = {**os.environ, "PYTHONPATH": str(ops.ROOT), "OMP_NUM_THREADS": "1"}

    # Init containers, as written; they must build a teacher and a student whose
    # tokenizers pass the handshake (same fingerprint), and a readable prompts file.
    for spec in (teacher_spec, trainer_spec):
        for init in spec.get("initContainers", []):
            argv = [
                sys.executable if a == "python" else _local(a, tmp_path) for a in init["command"]
            ]
            subprocess.run(argv, check=True, env=env, capture_output=True, timeout=300)
    run = yaml.safe_load(ops.find(docs, "ConfigMap", "trainer-config")["data"]["train.yaml"])
    config = {}
    for source in teacher_spec["containers"][0]["envFrom"]:
        config.update(ops.find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    teacher_dir = _local(config["TEACHER_MODEL"].split("=", 1)[-1], tmp_path)
    student_dir = _local(run["student"]["model_dir"], tmp_path)
    fingerprints = {
        tokenizer_fingerprint(AutoTokenizer.from_pretrained(d)) for d in (teacher_dir, student_dir)
    }
    assert len(fingerprints) == 1
    prompts = Path(_local(run["data"]["prompts"], tmp_path))
    rows = [yaml.safe_load(line) for line in prompts.read_text().splitlines()]
    assert rows and all(r["prompt"][0] == 1 and r["prompt"][-1] == 4 for r in rows)

    # The teacher, from the Deployment's args and ConfigMap.
    container = teacher_spec["containers"][0]
    grpc_port, http_port = _free_port(), _free_port()
    args = [_local(ops.expand(a, config), tmp_path) for a in container["args"]]
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--grpc-port") + 1] = str(grpc_port)
    args[args.index("--http-port") + 1] = str(http_port)
    log = (tmp_path / "teacher.log").open("w")
    teacher = subprocess.Popen(
        [sys.executable, str(ops.ROOT / "hybrid_distill_cli.py"), *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        startup = container["startupProbe"]
        url = f"http://127.0.0.1:{http_port}{startup['httpGet']['path']}"
        deadline = time.monotonic() + 120
        while _get(url) != 200:
            assert teacher.poll() is None, (tmp_path / "teacher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "teacher never became ready"
            time.sleep(0.5)

        # Worker 0 of the Indexed Job, from the Job's args and train.yaml.
        trainer = trainer_spec["containers"][0]
        worker_env = {"POD_NAMESPACE": "hybrid-distill-dev", "WORKER_INDEX": "0"}
        worker_env.update({e["name"]: e["value"] for e in trainer["env"] if "value" in e})
        train_yaml = ops.find(docs, "ConfigMap", "trainer-config")["data"]["train.yaml"]
        config_path = tmp_path / "train.yaml"
        config_path.write_text(_local(train_yaml, tmp_path))
        argv = [_local(ops.expand(a, worker_env), tmp_path) for a in trainer["args"]]
        argv[argv.index("--config") + 1] = str(config_path)
        argv[argv.index("--run.metrics-port") + 1] = str(_free_port())
        # Only the run is shortened (the same loop, 4 steps instead of train.yaml's 20),
        # to keep CI fast on two cores; a checkpoint is still saved.
        argv += ["--run.steps", "4", "--run.save_every", "2"]
        i = argv.index("--teachers") + 1
        argv[i] = argv[i].replace(
            "dns:///teacher-grpc.hybrid-distill-dev.svc:50051", f"127.0.0.1:{grpc_port}"
        )
        assert f"127.0.0.1:{grpc_port}" in argv[i]
        proc = subprocess.run(
            [sys.executable, str(ops.ROOT / "hybrid_distill_cli.py"), *argv],
            env={**env, "HOSTNAME": "trainer-0"},
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out_dir = Path(argv[argv.index("--run.out-dir") + 1])
        assert out_dir.is_dir() and any(out_dir.iterdir()), "the worker wrote nothing"

        # tools/deploy_kind.py's final check, against this teacher.
        spec = importlib.util.spec_from_file_location(
            "deploy_kind", ops.ROOT / "tools" / "deploy_kind.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        check = module._CHECK_SCORED.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
        scored = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
        assert scored.returncode == 0, scored.stdout + scored.stderr
    finally:
        teacher.send_signal(signal.SIGTERM)
        try:
            rc = teacher.wait(timeout=teacher_spec["terminationGracePeriodSeconds"])
        finally:
            teacher.kill()
            log.close()
    assert rc == 0, (tmp_path / "teacher.log").read_text()[-3000:]
