"""job/teacher-model-fetch fills the model volume; the teacher waits for it.

The Job's and the init container's commands are run here as written in the rendered
production overlay, with the container's environment from the teacher ConfigMap and
/models mapped to a temporary directory. There is no route to the Hugging Face Hub
here, so `hf` is a stub on PATH that records its arguments and writes a file the way
`hf download --local-dir` does; everything else (model path parsing, marker, waiting)
is the real command.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.deploy import ops

MARKER = ".hybrid-distill-fetched"


@pytest.fixture(scope="module")
def production():
    return ops.documents(ops.render_overlay("production"))


def _container_env(docs, container) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(ops.find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _local(command: list[str], env: dict[str, str], root: Path) -> tuple[list[str], dict]:
    """The command and env with /models moved under root and python as this python."""
    argv = [sys.executable if a == "python" else a for a in command]
    local_env = {k: v.replace("/models", str(root / "models")) for k, v in env.items()}
    return argv, local_env


def _fake_hf(bin_dir: Path, log: Path) -> None:
    bin_dir.mkdir()
    hf = bin_dir / "hf"
    hf.write_text(
        f"#!{sys.executable}\n"
        "import json, pathlib, sys\n"
        f"pathlib.Path({str(log)!r}).open('a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--local-dir') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'config.json').write_text('{}')\n"
    )
    hf.chmod(0o755)


def test_fetch_job_downloads_the_configured_revision_into_the_teacher_model_dir(
    production, tmp_path
):
    job = ops.find(production, "Job", "teacher-model-fetch")
    spec = job["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = _container_env(production, container)
    revision = f"{random.getrandbits(64):016x}"
    env["TEACHER_HF_REVISION"] = revision
    argv, local_env = _local(container["command"], env, tmp_path)
    log = tmp_path / "hf.log"
    _fake_hf(tmp_path / "bin", log)
    local_env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    local_env["PYTHONPATH"] = str(ops.ROOT)
    proc = subprocess.run(argv, env=local_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model_dir = Path(
        env["TEACHER_MODEL"].split("=", 1)[1].replace("/models", str(tmp_path / "models"))
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [
        ["download", env["TEACHER_HF_REPO"], "--revision", revision, "--local-dir", str(model_dir)]
    ]
    assert (model_dir / MARKER).read_text().strip() == f"{env['TEACHER_HF_REPO']}@{revision}"
    # Second run: the marker says the directory holds this revision; no download.
    proc = subprocess.run(argv, env=local_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already holds" in proc.stdout
    assert len(log.read_text().splitlines()) == 1
    # The Job writes the volume the teacher reads, at the path the server loads.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts["/models"].get("readOnly", False)
    volume = next(v for v in spec["volumes"] if v["name"] == mounts["/models"]["name"])
    teacher_spec = ops.find(production, "Deployment", "teacher")["spec"]["template"]["spec"]
    teacher_models = next(v for v in teacher_spec["volumes"] if v["name"] == "models")
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == teacher_models["persistentVolumeClaim"]["claimName"]
    )
    # A token for gated repositories is optional and read from a file, never from args.
    token = next(v for v in spec["volumes"] if v["name"] == "hf-token")["secret"]
    assert token["optional"] is True
    assert env["HF_TOKEN_PATH"].startswith(mounts["/etc/hybrid-distill/hf"]["mountPath"])
    # The image is offline by default; the fetch pod alone turns the hub on.
    assert env["HF_HUB_OFFLINE"] == "0"


def test_fetch_job_fails_when_the_download_fails(production, tmp_path):
    """A failed download exits non-zero (the Job retries) and writes no marker."""
    job = ops.find(production, "Job", "teacher-model-fetch")
    [container] = job["spec"]["template"]["spec"]["containers"]
    argv, env = _local(container["command"], _container_env(production, container), tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hf").write_text("#!/bin/sh\necho 'repository not found' >&2\nexit 1\n")
    (tmp_path / "bin" / "hf").chmod(0o755)
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    env["PYTHONPATH"] = str(ops.ROOT)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert not list((tmp_path).rglob(MARKER))


def test_teacher_waits_for_the_fetched_revision(production, tmp_path):
    """wait-for-model blocks while the marker is missing or names another revision,
    and returns once the Job has written the configured one."""
    spec = ops.find(production, "Deployment", "teacher")["spec"]["template"]["spec"]
    init = {c["name"]: c for c in spec["initContainers"]}["wait-for-model"]
    assert next(m for m in init["volumeMounts"] if m["mountPath"] == "/models")["readOnly"]
    env = _container_env(production, init)
    argv, local_env = _local(init["command"], env, tmp_path)
    local_env["MODEL_POLL_SECONDS"] = "0.1"
    local_env["PYTHONPATH"] = str(ops.ROOT)
    model_dir = Path(local_env["TEACHER_MODEL"].split("=", 1)[1])
    model_dir.mkdir(parents=True)
    (model_dir / MARKER).write_text(f"{env['TEACHER_HF_REPO']}@some-older-revision\n")
    proc = subprocess.Popen(argv, env=local_env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert proc.poll() is None, "started a teacher on another revision's weights"
        (model_dir / MARKER).write_text(f"{env['TEACHER_HF_REPO']}@{env['TEACHER_HF_REVISION']}\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_cpu_dev_builds_its_model_and_fetches_nothing():
    docs = ops.documents(ops.render_overlay("cpu-dev"))
    assert not [d for d in docs if d["metadata"]["name"] == "teacher-model-fetch"]
    spec = ops.find(docs, "Deployment", "teacher")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["make-model"]
