"""The Dockerfiles: hadolint-clean, checkov-clean, non-root, pinned, health-checked.

No Docker engine runs here, so the images are checked statically. The ports they expose
must be the ones the Kubernetes manifests use.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from tests.deploy import ops

DOCKERFILES = {
    "teacher": (ops.DEPLOY / "docker" / "teacher.Dockerfile", {50051, 8000}),
    "trainer": (ops.DEPLOY / "docker" / "trainer.Dockerfile", {9400}),
}


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint_clean(image):
    hadolint = ops.require("hadolint")
    path, _ = DOCKERFILES[image]
    proc = ops.run([hadolint, "--failure-threshold", "info", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_a_regression(tmp_path):
    """An unpinned apt install or a root USER added to our file is reported."""
    hadolint = ops.require("hadolint")
    path, _ = DOCKERFILES[random.choice(sorted(DOCKERFILES))]
    bad = random.choice(["RUN apt-get install -y curl", "USER root", "RUN cd /tmp && ls"])
    text = path.read_text().replace("\nUSER 10001:10001", f"\n{bad}\nUSER 10001:10001")
    if bad == "USER root":
        text = text.replace("USER 10001:10001", "USER root")
    broken = tmp_path / "Dockerfile"
    broken.write_text(text)
    proc = ops.run([hadolint, "--failure-threshold", "info", broken])
    assert proc.returncode != 0, f"hadolint accepted {bad!r}"


def test_checkov_clean(tmp_path):
    checkov = ops.require("checkov")
    flags = ["--framework", "dockerfile", "--compact", "--quiet", "--skip-download"]
    proc = ops.run([checkov, "-d", ops.DEPLOY / "docker", *flags])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Failed checks: 0" in proc.stdout


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_runtime_stage_is_non_root_pinned_and_health_checked(image):
    path, ports = DOCKERFILES[image]
    text = path.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    for stage in stages:
        base = stage.split()[0]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", base), f"unpinned base {base}"
        assert not base.endswith(":latest")
    runtime = stages[-1]
    users = re.findall(r"^USER (\S+)", runtime, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert int(users[-1].split(":")[0]) >= 10000  # matches runAsUser in the manifests
    assert re.search(r"^HEALTHCHECK .*CMD", runtime, flags=re.M | re.S)
    exposed = {
        int(p) for line in re.findall(r"^EXPOSE (.+)$", runtime, flags=re.M) for p in line.split()
    }
    assert exposed == ports


def test_exposed_ports_match_the_manifests():
    docs = ops.documents(ops.render_overlay("production"))
    by_kind = {"Deployment": "teacher", "Job": "trainer"}
    for doc in docs:
        if doc["kind"] in by_kind and doc["metadata"]["name"] == by_kind[doc["kind"]]:
            container = doc["spec"]["template"]["spec"]["containers"][0]
            declared = {p["containerPort"] for p in container["ports"]}
            assert declared == DOCKERFILES[by_kind[doc["kind"]]][1], doc["kind"]
            assert Path(container["image"].split(":")[0]).name == by_kind[doc["kind"]]
