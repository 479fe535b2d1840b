"""The fetch Jobs fill the model volumes; the teacher and the trainers wait for them.

job/teacher-model-fetch fills teacher-models with the teacher, job/student-model-fetch
fills trainer-checkpoints with the student. Their commands and the wait-for-model /
wait-for-student init containers' commands are run here as written in the rendered
production overlay, with each container's environment from its ConfigMap and the
volume's mount point mapped to a temporary directory. There is no route to the Hugging
Face Hub here, so `hf` is a stub on PATH that records its arguments and writes a file
the way `hf download --local-dir` does; everything else (model path parsing, marker,
waiting) is the real command.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.deploy import ops

MARKER = ".hybrid-distill-fetched"


@dataclass(frozen=True)
class Fetch:
    job: str
    prefix: str  # TEACHER / STUDENT: the ConfigMap keys <prefix>_MODEL, _HF_REPO, _HF_REVISION
    owner: tuple[str, str]  # the workload whose init container waits
    waiter: str
    mount: str  # where the volume is mounted in every pod
    claim: str


FETCHES = {
    "teacher": Fetch(
        "teacher-model-fetch",
        "TEACHER",
        ("Deployment", "teacher"),
        "wait-for-model",
        "/models",
        "teacher-models",
    ),
    "student": Fetch(
        "student-model-fetch",
        "STUDENT",
        ("Job", "trainer"),
        "wait-for-student",
        "/checkpoints",
        "trainer-checkpoints",
    ),
}


@pytest.fixture(scope="module")
def production():
    return ops.documents(ops.render_overlay("production"))


def _container_env(docs, container) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(ops.find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _local(command: list[str], env: dict[str, str], mount: str, root: Path):
    """The command and env with the mount point moved under root, python as this one."""
    argv = [sys.executable if a == "python" else a for a in command]
    local = {k: v.replace(mount, str(root / mount.strip("/"))) for k, v in env.items()}
    local["PYTHONPATH"] = str(ops.ROOT)
    return argv, local


def _model_dir(env: dict[str, str], prefix: str) -> Path:
    return Path(env[f"{prefix}_MODEL"].split("=", 1)[-1])


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


@pytest.mark.parametrize("which", sorted(FETCHES))
def test_fetch_job_downloads_the_configured_revision_where_it_is_loaded(
    which, production, tmp_path
):
    fetch = FETCHES[which]
    spec = ops.find(production, "Job", fetch.job)["spec"]["template"]["spec"]
    [container] = spec["containers"]
    env = _container_env(production, container)
    revision = f"{random.getrandbits(64):016x}"
    env[f"{fetch.prefix}_HF_REVISION"] = revision
    repo = env[f"{fetch.prefix}_HF_REPO"]
    argv, local_env = _local(container["command"], env, fetch.mount, tmp_path)
    log = tmp_path / "hf.log"
    _fake_hf(tmp_path / "bin", log)
    local_env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(argv, env=local_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    model_dir = _model_dir(local_env, fetch.prefix)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["download", repo, "--revision", revision, "--local-dir", str(model_dir)]]
    assert (model_dir / MARKER).read_text().strip() == f"{repo}@{revision}"
    # Second run: the marker says the directory holds this revision; no download.
    proc = subprocess.run(argv, env=local_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "already holds" in proc.stdout
    assert len(log.read_text().splitlines()) == 1
    # The Job writes the claim the consumers read, mounted where they read it.
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert not mounts[fetch.mount].get("readOnly", False)
    volume = next(v for v in spec["volumes"] if v["name"] == mounts[fetch.mount]["name"])
    assert volume["persistentVolumeClaim"]["claimName"] == fetch.claim
    # A token for gated repositories is optional and read from a file, never from args.
    token = next(v for v in spec["volumes"] if v["name"] == "hf-token")["secret"]
    assert token["optional"] is True
    assert env["HF_TOKEN_PATH"].startswith(mounts["/etc/hybrid-distill/hf"]["mountPath"])
    # The image is offline by default; the fetch pod alone turns the Hub on.
    assert env["HF_HUB_OFFLINE"] == "0"


def test_fetched_directories_are_the_ones_loaded(production):
    """The teacher's directory is the server's --model; the student's is train.yaml's
    student.model_dir."""
    teacher_env = ops.find(production, "ConfigMap", "teacher-config")["data"]
    teacher = ops.find(production, "Deployment", "teacher")["spec"]["template"]["spec"]
    assert "$(TEACHER_MODEL)" in teacher["containers"][0]["args"]
    assert str(_model_dir(teacher_env, "TEACHER")).startswith("/models/")
    student_env = ops.find(production, "ConfigMap", "student-source")["data"]
    run = yaml.safe_load(ops.find(production, "ConfigMap", "trainer-config")["data"]["train.yaml"])
    assert str(_model_dir(student_env, "STUDENT")) == run["student"]["model_dir"]


@pytest.mark.parametrize("which", sorted(FETCHES))
def test_fetch_job_fails_when_the_download_fails(which, production, tmp_path):
    """A failed download exits non-zero (the Job retries) and writes no marker."""
    fetch = FETCHES[which]
    [container] = ops.find(production, "Job", fetch.job)["spec"]["template"]["spec"]["containers"]
    env = _container_env(production, container)
    argv, local_env = _local(container["command"], env, fetch.mount, tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hf").write_text("#!/bin/sh\necho 'repository not found' >&2\nexit 1\n")
    (tmp_path / "bin" / "hf").chmod(0o755)
    local_env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(argv, env=local_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert not list(tmp_path.rglob(MARKER))


@pytest.mark.parametrize("which", sorted(FETCHES))
def test_consumers_wait_for_the_fetched_revision(which, production, tmp_path):
    """The init container blocks while the marker is missing or names another revision,
    and returns once the Job has written the configured one."""
    fetch = FETCHES[which]
    spec = ops.find(production, *fetch.owner)["spec"]["template"]["spec"]
    init = {c["name"]: c for c in spec["initContainers"]}[fetch.waiter]
    assert next(m for m in init["volumeMounts"] if m["mountPath"] == fetch.mount)["readOnly"]
    env = _container_env(production, init)
    argv, local_env = _local(init["command"], env, fetch.mount, tmp_path)
    local_env["MODEL_POLL_SECONDS"] = "0.1"
    model_dir = _model_dir(local_env, fetch.prefix)
    model_dir.mkdir(parents=True)
    repo = env[f"{fetch.prefix}_HF_REPO"]
    (model_dir / MARKER).write_text(f"{repo}@some-older-revision\n")
    proc = subprocess.Popen(argv, env=local_env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert proc.poll() is None, "started on another revision's weights"
        (model_dir / MARKER).write_text(f"{repo}@{env[f'{fetch.prefix}_HF_REVISION']}\n")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_cpu_dev_builds_its_models_and_fetches_nothing():
    docs = ops.documents(ops.render_overlay("cpu-dev"))
    names = {d["metadata"]["name"] for d in docs}
    assert not {"teacher-model-fetch", "student-model-fetch"} & names
    assert not [n for n in names if n.startswith("student-source")]
    teacher = ops.find(docs, "Deployment", "teacher")["spec"]["template"]["spec"]
    assert [c["name"] for c in teacher["initContainers"]] == ["make-model"]
    trainer = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]
    assert [c["name"] for c in trainer["initContainers"]] == ["make-student-and-prompts"]
