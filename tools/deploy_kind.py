"""A newcomer's path: a fresh kind (or minikube) cluster running the cpu-dev teacher and a
trainer Job that completes, then a check of the result (docs/deploy.md, "First deploy").

    python tools/deploy_kind.py --dry-run     # print every step and manifest, validate them
    python tools/deploy_kind.py               # run it (docker, kind, kubectl on PATH)
    python tools/deploy_kind.py --teardown    # delete the cluster again

Steps: build the CPU images (teacher-cpu.Dockerfile; trainer.Dockerfile with the CPU
torch index), create the cluster, load the images into its node, apply the namespace,
the teacher-auth Secret (a fresh random token) and the rendered cpu-dev overlay, wait
for the teacher rollout and for the trainer Job to complete, then read the teacher's
scored-token counter. What is applied is exactly what --dry-run validated: manifests
are rendered here with `kubectl kustomize` and fed to `kubectl apply -f -`.

Both modes validate the manifests with kubernetes-validate first (bash
tools/setup_ops_tools.sh installs it). --dry-run needs only kubectl (for kustomize)
and kubernetes-validate; it runs no container engine and touches no cluster.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "cpu-dev"
NAMESPACE = "hybrid-distill-dev"
TEACHER_IMAGE = "hybrid-distill/teacher-cpu:0.1.0"
TRAINER_IMAGE = "hybrid-distill/trainer:0.1.0"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
KUBERNETES_VERSION = "1.33.0"  # schema version kubernetes-validate checks against
# Which tool each runtime needs, besides kubectl.
RUNTIME_TOOLS = {"kind": ("docker", "kind"), "minikube": ("docker", "minikube")}


@dataclass(frozen=True)
class Step:
    """One command; `manifest` (YAML) is fed on stdin, `shown` is what gets printed."""

    title: str
    argv: tuple[str, ...]
    manifest: str | None = None
    shown: str | None = None
    may_fail: bool = False  # e.g. a cluster that already exists


def find_tool(name: str) -> str | None:
    """A tool on PATH, else where tools/setup_ops_tools.sh installs it."""
    for candidate in (
        shutil.which(name),
        *(ROOT / v / "bin" / name for v in (".venv-ops", ".venv")),
    ):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def render_overlay(overlay: Path) -> str:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        raise SystemExit("kubectl is not installed: run `bash tools/setup_ops_tools.sh`")
    proc = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"kubectl kustomize {overlay} failed:\n{proc.stderr}")
    return proc.stdout


def namespace_manifest() -> str:
    return yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    )


def secret_manifest(token: str) -> str:
    """The teacher-auth Secret (key `token`) that the teacher and the trainers mount."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "teacher-auth", "namespace": NAMESPACE},
            "type": "Opaque",
            "data": {"token": base64.b64encode(token.encode()).decode()},
        }
    )


# Reads the teacher's /metrics inside its pod and fails unless tokens were scored.
_CHECK_SCORED = (
    "import re, sys, urllib.request; "
    'text = urllib.request.urlopen("http://127.0.0.1:8000/metrics", timeout=10).read().decode(); '
    'rows = re.findall(r"^teacher_service_tokens_scored_total\\S* (\\S+)$", text, re.M); '
    "n = sum(float(v) for v in rows); "
    'print(f"teacher scored {n:.0f} tokens"); sys.exit(0 if n > 0 else 1)'
)


def steps(runtime: str, cluster: str, overlay: Path, token: str) -> list[Step]:
    kubectl = ("kubectl", "--context", f"kind-{cluster}" if runtime == "kind" else cluster)
    ns = (*kubectl, "--namespace", NAMESPACE)
    if runtime == "kind":
        create = Step(
            "Create the cluster", ("kind", "create", "cluster", "--name", cluster), may_fail=True
        )
        load = Step(
            "Load the images into the node",
            ("kind", "load", "docker-image", TEACHER_IMAGE, TRAINER_IMAGE, "--name", cluster),
        )
    else:
        create = Step(
            "Create the cluster",
            ("minikube", "start", "--profile", cluster, "--cpus", "4", "--memory", "8g"),
        )
        load = Step(
            "Load the images into the node",
            ("minikube", "--profile", cluster, "image", "load", TEACHER_IMAGE, TRAINER_IMAGE),
        )
    secret = secret_manifest(token)
    shown_secret = secret.replace(base64.b64encode(token.encode()).decode(), "<random token>")
    return [
        Step(
            "Build the CPU teacher image (torch +cpu, no CUDA, no vLLM)",
            (
                "docker",
                "build",
                "-f",
                "deploy/docker/teacher-cpu.Dockerfile",
                "-t",
                TEACHER_IMAGE,
                ".",
            ),
        ),
        Step(
            "Build the trainer image with the CPU torch build",
            (
                "docker",
                "build",
                "-f",
                "deploy/docker/trainer.Dockerfile",
                "--build-arg",
                f"TORCH_INDEX_URL={CPU_TORCH_INDEX}",
                "-t",
                TRAINER_IMAGE,
                ".",
            ),
        ),
        create,
        load,
        Step("Create the namespace", (*kubectl, "apply", "-f", "-"), namespace_manifest()),
        Step(
            "Create the teacher-auth Secret (random token)",
            (*kubectl, "apply", "-f", "-"),
            secret,
            shown_secret,
        ),
        Step(
            f"Apply the cpu-dev overlay ({os.path.relpath(overlay, ROOT)})",
            (*kubectl, "apply", "-f", "-"),
            render_overlay(overlay),
        ),
        Step(
            "Wait for the teacher (init container builds the model, then /readyz)",
            (*ns, "rollout", "status", "deployment/teacher", "--timeout=10m"),
        ),
        Step(
            "Wait for the trainer Job to complete (every index)",
            (*ns, "wait", "--for=condition=complete", "job/trainer", "--timeout=30m"),
        ),
        Step(
            "Show the trainers' last log lines",
            (*ns, "logs", "--selector=app.kubernetes.io/component=trainer", "--tail=5", "--prefix"),
        ),
        Step(
            "Check that the teacher scored tokens",
            (*ns, "exec", "deployment/teacher", "--", "python", "-c", _CHECK_SCORED),
        ),
    ]


def teardown_steps(runtime: str, cluster: str) -> list[Step]:
    if runtime == "kind":
        return [Step("Delete the cluster", ("kind", "delete", "cluster", "--name", cluster))]
    return [Step("Delete the cluster", ("minikube", "delete", "--profile", cluster))]


def validate(manifests: list[str]) -> int:
    """kubernetes-validate --strict on every manifest; returns the number of objects."""
    tool = find_tool("kubernetes-validate")
    if tool is None:
        raise SystemExit(
            "kubernetes-validate is not installed: run `bash tools/setup_ops_tools.sh`"
        )
    docs = [d for text in manifests for d in yaml.safe_load_all(text) if d]
    # Prometheus Operator kinds are not built in; cpu-dev has none, production would.
    builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifests.yaml"
        path.write_text(yaml.safe_dump_all(builtin))
        proc = subprocess.run(
            [tool, "--strict", "--quiet", "-k", KUBERNETES_VERSION, str(path)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
    if proc.returncode != 0 or "ERROR" in proc.stdout + proc.stderr:
        raise SystemExit(f"manifest validation failed:\n{proc.stdout}{proc.stderr}")
    return len(docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print and validate, run nothing")
    parser.add_argument("--teardown", action="store_true", help="delete the cluster")
    parser.add_argument("--runtime", choices=sorted(RUNTIME_TOOLS), default="kind")
    parser.add_argument("--cluster", default="hybrid-distill", help="cluster / profile name")
    parser.add_argument("--overlay", type=Path, default=OVERLAY, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # image builds use the repository root as context

    if args.teardown:
        plan = teardown_steps(args.runtime, args.cluster)
    else:
        plan = steps(args.runtime, args.cluster, args.overlay.resolve(), secrets.token_hex(32))
    needed = ("kubectl", *RUNTIME_TOOLS[args.runtime])
    missing = [t for t in needed if shutil.which(t) is None]
    print(
        f"# tools: {', '.join(needed)}"
        + (f" (missing here: {', '.join(missing)})" if missing else "")
    )
    if missing and not args.dry_run:
        raise SystemExit(f"install {', '.join(missing)} first (docs/deploy.md, 'First deploy')")
    # Validated before anything runs, in a real run too: a bad manifest stops the plan
    # before the (long) image builds.
    manifests = [s.manifest for s in plan if s.manifest]
    if manifests:
        n = validate(manifests)
        print(
            f"# kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION}): {n} objects valid"
        )

    for i, step in enumerate(plan, 1):
        print(
            f"\n## {i}. {step.title}\n$ {shlex.join(step.argv)}"
            + (" <<EOF" if step.manifest else "")
        )
        if step.manifest and args.dry_run:
            print((step.shown or step.manifest).rstrip() + "\nEOF")
        if args.dry_run:
            continue
        proc = subprocess.run(step.argv, input=step.manifest, text=True, check=False)
        if proc.returncode != 0 and not step.may_fail:
            print(f"step {i} failed ({step.title}); tear down with --teardown", file=sys.stderr)
            return proc.returncode
    print("\n# dry run: nothing was executed" if args.dry_run else "\n# done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
