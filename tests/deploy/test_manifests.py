"""The Kubernetes manifests: schema-valid, policy-clean, and consistent with the service.

Both overlays are rendered with `kubectl kustomize`, then:
- built-in kinds pass `kubernetes-validate --strict` (unknown fields are errors);
- ServiceMonitor, PodMonitor and PrometheusRule pass the Prometheus Operator CRD models
  (cloudcoil-models-prometheus-operator), with unknown fields refused;
- checkov passes, and every skip carries a written justification;
- the teacher's arguments parse with the real server CLI, the drain timing adds up, and
  the Services, probes, policies and monitors point at ports that exist.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import ops
from trainer import config as trainer_config

KUBERNETES_VERSION = "1.33.0"
CRD_GROUP = "monitoring.coreos.com/v1"


@pytest.fixture(scope="module", params=ops.OVERLAYS)
def rendered(request) -> tuple[str, list[dict[str, Any]]]:
    return request.param, ops.documents(ops.render_overlay(request.param))


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return ops.documents(ops.render_overlay("production"))


@pytest.fixture(scope="module")
def cpu_dev() -> list[dict[str, Any]]:
    return ops.documents(ops.render_overlay("cpu-dev"))


def _pod_specs(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "Job"):
            yield d, d["spec"]["template"]["spec"]


# --- schema validation -----------------------------------------------------------------


def _kubernetes_validate(docs, tmp_path: Path):
    tool = ops.require("kubernetes-validate")
    path = tmp_path / "manifests.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return ops.run([tool, "--strict", "--quiet", "-k", KUBERNETES_VERSION, path])


def test_builtin_kinds_pass_kubernetes_validate_strict(rendered, tmp_path):
    _, docs = rendered
    builtin = [d for d in docs if d["apiVersion"] != CRD_GROUP]
    proc = _kubernetes_validate(builtin, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout + proc.stderr


def test_kubernetes_validate_strict_rejects_an_unknown_field(production, tmp_path):
    docs = copy.deepcopy([d for d in production if d["apiVersion"] != CRD_GROUP])
    victim = random.choice(docs)
    # Inside spec where there is one (the interesting nesting), else at the top level.
    victim.get("spec", victim)[f"bogus{random.randrange(1000)}"] = "x"
    proc = _kubernetes_validate(docs, tmp_path)
    assert proc.returncode != 0, f"unknown field in {victim['kind']} passed"


def _unknown_fields(doc: Any, dumped: Any, path: str = "") -> list[str]:
    """Keys of `doc` that the validated model dropped (pydantic ignores extras)."""
    if isinstance(doc, dict):
        if not isinstance(dumped, dict):
            return [path or "/"]
        out = []
        for key, value in doc.items():
            if key not in dumped:
                out.append(f"{path}/{key}")
            else:
                out += _unknown_fields(value, dumped[key], f"{path}/{key}")
        return out
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in _unknown_fields(v, dumped[i], f"{path}/{i}")]
    return []


def _validate_crd(doc: dict[str, Any]) -> list[str]:
    try:
        from cloudcoil.models.prometheus_operator import v1
    except ImportError:
        ops.tool_missing(f"cloudcoil-models-prometheus-operator is not installed: {ops.SETUP_HINT}")

    model = getattr(v1, doc["kind"])
    obj = model.model_validate(doc)
    dumped = obj.model_dump(by_alias=True, exclude_none=True, mode="json")
    return _unknown_fields(doc, dumped)


def test_custom_resources_pass_prometheus_operator_crd_models(production):
    crs = [d for d in production if d["apiVersion"] == CRD_GROUP]
    assert sorted(d["kind"] for d in crs) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for doc in crs:
        assert _validate_crd(doc) == [], doc["kind"]


def test_crd_check_rejects_unknown_fields_and_wrong_types(production):
    from pydantic import ValidationError

    monitor = copy.deepcopy(ops.find(production, "ServiceMonitor", "teacher"))
    bogus = f"scrapeEvery{random.randrange(1000)}"
    monitor["spec"]["endpoints"][0][bogus] = "15s"
    assert _validate_crd(monitor) == [f"/spec/endpoints/0/{bogus}"]
    rule = copy.deepcopy(ops.find(production, "PrometheusRule", "hybrid-distill"))
    rule["spec"]["groups"][0]["rules"] = "not a list"
    with pytest.raises(ValidationError):
        _validate_crd(rule)


def test_prometheusrule_is_generated_from_the_rule_file():
    proc = ops.run([sys.executable, ops.MONITORING / "render_prometheusrule.py", "--check"])
    assert proc.returncode == 0, proc.stderr


# --- checkov -----------------------------------------------------------------------------


def test_checkov_passes_on_rendered_manifests(tmp_path):
    checkov = ops.require("checkov")
    for overlay in ops.OVERLAYS:
        (tmp_path / f"{overlay}.yaml").write_text(ops.render_overlay(overlay))
    # --skip-download: no policy metadata fetch (CI has no route to the vendor's API).
    flags = ["--framework", "kubernetes", "--compact", "--quiet", "--skip-download"]
    proc = ops.run([checkov, "-d", tmp_path, *flags])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Failed checks: 0" in proc.stdout


def test_every_checkov_skip_is_justified(rendered):
    _, docs = rendered
    for d in docs:
        for key, value in d["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert re.fullmatch(r"CKV2?_K8S_\d+", check), value
                assert len(reason.split()) >= 8, f"{d['kind']} {key}: say why: {value!r}"


# --- consistency with the service ---------------------------------------------------------


def _teacher(docs):
    deploy = ops.find(docs, "Deployment", "teacher")
    return deploy, deploy["spec"]["template"]["spec"]


def _expanded_args(docs) -> list[str]:
    """The teacher's args with $(VAR) expanded from its ConfigMap, as the kubelet does."""
    _, spec = _teacher(docs)
    container = spec["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(ops.find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    expanded = [ops.expand(a, env) for a in container["args"]]
    assert not any("$(" in a for a in expanded), expanded
    return expanded


def test_teacher_args_parse_with_the_server_cli(rendered):
    from teacher_service.config import ModelSpec, ServerConfig, build_parser

    name, docs = rendered
    args = _expanded_args(docs)
    assert args[0] == "serve"
    parsed = build_parser().parse_args(args[1:])
    config = ServerConfig(  # runs the server's own validation of the values
        models=tuple(ModelSpec.parse(m) for m in parsed.model),
        backend=parsed.backend,
        device=parsed.device,
        dtype=parsed.dtype,
        grpc_port=parsed.grpc_port,
        http_port=parsed.http_port,
        max_top_k=parsed.max_top_k,
        max_batch_tokens=parsed.max_batch_tokens,
        max_queued_tokens=parsed.max_queued_tokens,
        max_client_queued_tokens=parsed.max_client_queued_tokens,
        gpu_memory_utilization=parsed.gpu_memory_utilization,
        grace_seconds=parsed.grace_seconds,
        tls_cert=parsed.tls_cert,
        tls_key=parsed.tls_key,
    )
    _, spec = _teacher(docs)
    ports = {p["name"]: p["containerPort"] for p in _teacher(docs)[1]["containers"][0]["ports"]}
    assert ports == {"grpc": config.grpc_port, "http-metrics": config.http_port}
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert mounts[str(parsed.auth_token_file.parent)] == "auth"
    if name == "production-tls":
        assert mounts[str(config.tls_cert.parent)] == mounts[str(config.tls_key.parent)] == "tls"
        # Mutual TLS: client certificates must chain to the CA the trainers trust.
        client_ca = _volume_at(spec["containers"][0], spec, str(parsed.tls_client_ca))
        assert client_ca["configMap"]["name"] == "teacher-ca"
    else:
        assert config.tls_cert is None and parsed.tls_client_ca is None
    if name.startswith("production"):
        assert (config.backend, config.device, config.dtype) == ("vllm", "cuda", "bfloat16")
    else:
        assert (config.backend, config.device) == ("torch", "cpu")


# The one documented number the drain derives from (docs/deploy.md, "Rollout timing").
DRAIN_MARGIN_S = 10


def test_termination_grace_covers_prestop_and_server_drain(rendered, tmp_path):
    """drain = the deployed trainers' request deadline; termination grace = preStop +
    drain + margin, exactly, so changing one number without the others fails here."""
    _, docs = rendered
    args = _expanded_args(docs)
    grace = float(args[args.index("--grace-seconds") + 1])
    _, spec = _teacher(docs)
    pre_stop = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    total = spec["terminationGracePeriodSeconds"]
    trainer, _ = _trainer_config(docs, tmp_path, "ns", 0)
    [teacher] = trainer.teachers
    # A request accepted just before SIGTERM is answered or expired within the deadline.
    assert grace == teacher.deadline_s, (grace, teacher.deadline_s)
    # SIGTERM comes after preStop; the server then needs `grace` plus time to exit.
    assert total == pre_stop + grace + DRAIN_MARGIN_S, (pre_stop, grace, total)


def test_probes_hit_the_health_endpoints_on_the_http_port(rendered):
    _, docs = rendered
    container = _teacher(docs)[1]["containers"][0]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    # /healthz answers as soon as the HTTP port is up; only /readyz waits for the model.
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}


def test_every_container_is_hardened(rendered):
    _, docs = rendered
    for owner, spec in _pod_specs(docs):
        assert spec["automountServiceAccountToken"] is False
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] and pod_sc["runAsUser"] >= 10000
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in ops.pod_containers(spec):
            sc = c["securityContext"]
            where = f"{owner['kind']}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["runAsNonRoot"] is True, where
            assert c["resources"]["limits"]["memory"] and c["resources"]["limits"]["cpu"], where


def test_production_teacher_runs_on_dedicated_gpu_nodes(production):
    _, spec = _teacher(production)
    resources = spec["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    pool = spec["nodeSelector"]["hybrid-distill.io/pool"]
    tolerated = {(t["key"], t.get("value")) for t in spec["tolerations"]}
    assert ("hybrid-distill.io/pool", pool) in tolerated
    assert ("nvidia.com/gpu", None) in tolerated


def test_cpu_dev_overlay_needs_no_gpu_and_no_shared_storage(cpu_dev):
    text = yaml.safe_dump_all(cpu_dev)
    assert "nvidia.com/gpu" not in text
    assert "persistentVolumeClaim" not in text
    assert not [d for d in cpu_dev if d["kind"] == "PersistentVolumeClaim"]
    _, spec = _teacher(cpu_dev)
    assert "nodeSelector" not in spec and "tolerations" not in spec
    init = spec["initContainers"][0]
    assert init["command"][:3] == ["python", "-m", "teacher_service.random_model"]
    model_dir = init["command"][3]
    assert f"teacher={model_dir}" in _expanded_args(cpu_dev)


def test_services_and_monitors_point_at_real_ports(production):
    deploy, spec = _teacher(production)
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in spec["containers"][0]["ports"]}
    grpc = ops.find(production, "Service", "teacher-grpc")
    assert grpc["spec"]["clusterIP"] == "None"  # headless: client-side balancing
    metrics = ops.find(production, "Service", "teacher-metrics")
    for svc in (grpc, metrics):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    monitor = ops.find(production, "ServiceMonitor", "teacher")
    selected = [
        d
        for d in production
        if d["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= d["metadata"]["labels"].items()
    ]
    assert [s["metadata"]["name"] for s in selected] == ["teacher-metrics"]
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    job = ops.find(production, "Job", "trainer")
    trainer = job["spec"]["template"]["spec"]["containers"][0]
    pod_monitor = ops.find(production, "PodMonitor", "trainer")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in {
        p["name"] for p in trainer["ports"]
    }
    pdb = ops.find(production, "PodDisruptionBudget", "teacher")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_network_policies_admit_only_trainers_to_grpc_and_prometheus_to_metrics(rendered):
    _, docs = rendered
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    grpc = policies["teacher-grpc-from-trainers"]["ingress"]
    assert [p["port"] for rule in grpc for p in rule["ports"]] == ["grpc"]
    trainer_labels = ops.find(docs, "Job", "trainer")["spec"]["template"]["metadata"]["labels"]
    for rule in grpc:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}  # same namespace, trainer pods only
            assert peer["podSelector"]["matchLabels"].items() <= trainer_labels.items()
    for name, port in (
        ("teacher-metrics-from-prometheus", "http-metrics"),
        ("trainer-metrics-from-prometheus", "metrics"),
    ):
        rules = policies[name]["ingress"]
        assert [p["port"] for r in rules for p in r["ports"]] == [port]
        for r in rules:
            for peer in r["from"]:
                assert peer["podSelector"]["matchLabels"] == {
                    "app.kubernetes.io/name": "prometheus"
                }
                assert "namespaceSelector" in peer


def test_hpa_scales_the_teacher_on_queue_depth(production):
    deploy, _ = _teacher(production)
    assert "replicas" not in deploy["spec"]  # the HPA owns the count
    hpa = ops.find(production, "HorizontalPodAutoscaler", "teacher")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "teacher",
    }
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == ops.adapter_rule()["custom"][0]["name"]["as"]


def _volume_at(container: dict[str, Any], spec: dict[str, Any], path: str) -> dict[str, Any]:
    """The pod volume whose mount holds `path` (fails the test when none does)."""
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return next(v for v in spec["volumes"] if v["name"] == mount["name"])
    raise AssertionError(f"{path} is on no volume of {container['name']}")


def _trainer_config(docs, tmp_path: Path, namespace: str, index: int):
    """The trainer's TrainConfig from the Job's args, expanded as the kubelet would: the
    downward-API vars from the given namespace and index, literal values as written, and
    an empty process environment (nothing may come from a Secret-backed env var)."""
    job = ops.find(docs, "Job", "trainer")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {"POD_NAMESPACE": namespace, "WORKER_INDEX": str(index)}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            assert var["name"] in env, f"unexpected env {var['name']}"
    source = ops.find(docs, "ConfigMap", "trainer-config")["data"]["train.yaml"]
    config_path = tmp_path / "train.yaml"
    config_path.write_text(source)
    args = [ops.expand(a, env) for a in container["args"]]
    assert args[0] == "train"
    args[args.index("--config") + 1] = str(config_path)
    config, _ = trainer_config.parse_args(args[1:], environ={})
    return config, container


def test_trainer_args_and_config_parse_with_the_trainer_cli(rendered, tmp_path):
    """The Job's args + train.yaml through trainer.config: teacher, token file, TLS, port,
    worker; the token file is the teacher-auth Secret's `token`, as the teacher's is."""
    name, docs = rendered
    namespace = f"ns{random.randrange(1000)}"
    index = random.randrange(16)
    config, container = _trainer_config(docs, tmp_path, namespace, index)
    spec = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]
    [teacher] = config.teachers
    assert teacher.endpoints == (f"dns:///teacher-grpc.{namespace}.svc:50051",)
    assert teacher.token == ""  # never a literal token: it is read from the mounted file
    auth = _volume_at(container, spec, teacher.token_file)
    assert auth["secret"]["secretName"] == "teacher-auth"
    assert {i["key"]: i["path"] for i in auth["secret"]["items"]} == {
        "token": Path(teacher.token_file).name
    }
    _, teacher_spec = _teacher(docs)
    teacher_auth = next(v for v in teacher_spec["volumes"] if v["name"] == "auth")
    assert teacher_auth["secret"] == auth["secret"]  # both sides read the same key
    # The file's content is what the trainer sends (whitespace dropped, as the server does).
    token = f"{random.getrandbits(128):032x}"
    (tmp_path / "token").write_text(token + "\n")
    local = dataclasses.replace(teacher, token_file=str(tmp_path / "token"))
    assert local.bearer_token() == token
    if name == "production-tls":
        assert teacher.uses_tls and not teacher.server_name  # verified against the target
        ca = _volume_at(container, spec, teacher.ca_cert)
        assert ca["configMap"]["name"] == "teacher-ca"
        assert {i["key"]: i["path"] for i in ca["configMap"]["items"]} == {
            "ca.crt": Path(teacher.ca_cert).name
        }
        client = _volume_at(container, spec, teacher.client_cert)
        assert client == _volume_at(container, spec, teacher.client_key)
        assert client["secret"]["secretName"] == "trainer-tls"
        assert {i["key"]: i["path"] for i in client["secret"]["items"]} == {
            "tls.crt": Path(teacher.client_cert).name,
            "tls.key": Path(teacher.client_key).name,
        }
    else:
        assert not teacher.uses_tls
    assert config.run.client_id == ""  # the per-process default: <host>-<pid>-rank<rank>
    assert config.run.metrics_port == 9400
    assert {p["containerPort"] for p in container["ports"]} == {config.run.metrics_port}
    assert config.run.out_dir.endswith(f"worker-{index}") and config.run.seed == index
    for path in (config.student.model_dir, config.data.prompts, config.run.out_dir):
        _volume_at(container, spec, path)


def test_trainer_secrets_never_reach_args_or_env(rendered):
    """The token reaches trainers only as a file: no Secret-backed env var, no token in
    the args (both are visible to anyone who can list processes or describe the pod)."""
    _, docs = rendered
    container = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]["containers"][0]
    assert not [v for v in container["env"] if "secretKeyRef" in v.get("valueFrom", {})]
    assert not [s for s in container.get("envFrom", []) if "secretRef" in s]
    assert not [a for a in container["args"] if re.search(r"\btoken\s*:", a)]


def test_trainer_config_check_catches_a_token_on_the_command_line(rendered, tmp_path):
    """Mutation: the old Secret-env-into-args wiring is refused by the checks above."""
    _, docs = rendered
    docs = copy.deepcopy(docs)
    container = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]["containers"][0]
    container["env"].append(
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "teacher-auth", "key": "token"}}}
    )
    i = container["args"].index("--teachers") + 1
    container["args"][i] = container["args"][i].replace(
        "token_file: /etc/hybrid-distill/auth/token", "token: '$(TOKEN)'"
    )
    with pytest.raises(AssertionError):
        test_trainer_secrets_never_reach_args_or_env((None, docs))
    with pytest.raises(AssertionError, match="unexpected env TOKEN"):
        _trainer_config(docs, tmp_path, "ns", 0)


def test_trainers_are_an_indexed_job_sharing_the_headless_teacher(rendered):
    _, docs = rendered
    job = ops.find(docs, "Job", "trainer")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] >= 2
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    index_ref = env["WORKER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index_ref == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    grpc = ops.find(docs, "Service", "teacher-grpc")
    assert grpc["spec"]["clusterIP"] == "None" and grpc["spec"]["ports"][0]["port"] == 50051


def test_each_worker_gets_its_own_client_id(rendered, tmp_path):
    """Indexed Job pods have the host name <job>-<index>; the default client id built
    from it differs per worker, so the teacher's fair queue and the dashboard's tokens
    per client see N clients, not one."""
    _, docs = rendered
    job = ops.find(docs, "Job", "trainer")
    ids = set()
    for index in range(job["spec"]["completions"]):
        config, _ = _trainer_config(docs, tmp_path, "ns", index)
        host = f"{job['metadata']['name']}-{index}"
        ids.add(trainer_config.client_id_for(config.run, 0, {"HOSTNAME": host}))
    assert len(ids) == job["spec"]["completions"], ids


def test_secrets_are_referenced_never_committed(rendered):
    name, docs = rendered
    assert not [d for d in docs if d["kind"] == "Secret"]
    _, spec = _teacher(docs)
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == (
        {"teacher-auth", "teacher-tls"} if name.endswith("tls") else {"teacher-auth"}
    )
    job_spec = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]
    # Trainers never mount the teacher's private key; the CA comes from a ConfigMap the
    # operator creates (docs/deploy.md, "Secrets").
    assert {v["secret"]["secretName"] for v in job_spec["volumes"] if "secret" in v} == (
        {"teacher-auth", "trainer-tls"} if name.endswith("tls") else {"teacher-auth"}
    )
    assert not [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "teacher-ca"
    ]
