"""The production-tls overlay's security wiring works end to end, on loopback.

A fake cluster holds what the operator creates (docs/deploy.md, "Secrets"): the
`teacher-auth` token, `teacher-tls` (a server certificate naming
teacher-grpc.<namespace>.svc), `trainer-tls` (a client certificate) and the `teacher-ca`
ConfigMap, all from one CA generated here. Each pod's Secret and ConfigMap volumes are
written out as the kubelet would (items: key -> path), the container paths in the
rendered args are mapped onto them, and then a real teacher server started from the
teacher's args accepts a real trainer client built from the trainer's parsed config:
mutual TLS, certificate name and bearer token all check out. Dropping the client
certificate must be refused, so the check can fail.
"""

from __future__ import annotations

import dataclasses
import random
import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import ops
from tests.pki import issue_certificate


def _cluster(namespace: str, token: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(kind, name): data} of what the operator creates for production-tls."""
    ca = issue_certificate("hybrid-distill-ca", is_ca=True)
    server = issue_certificate("teacher", ca=ca, dns_names=(f"teacher-grpc.{namespace}.svc",))
    client = issue_certificate("trainer", ca=ca)
    return {
        ("secret", "teacher-auth"): {"token": token + "\n"},
        ("secret", "teacher-tls"): {
            "tls.crt": server.cert_pem.decode(),
            "tls.key": server.key_pem.decode(),
        },
        ("secret", "trainer-tls"): {
            "tls.crt": client.cert_pem.decode(),
            "tls.key": client.key_pem.decode(),
        },
        ("configMap", "teacher-ca"): {"ca.crt": ca.cert_pem.decode()},
    }


def _mount(pod: dict[str, Any], cluster: dict, root: Path) -> dict[str, Path]:
    """Writes the pod's Secret/ConfigMap volumes under root; {mountPath: local dir}."""
    container = pod["containers"][0]
    out: dict[str, Path] = {}
    for volume in pod["volumes"]:
        kind = "secret" if "secret" in volume else "configMap" if "configMap" in volume else None
        if kind is None:
            continue
        source = volume[kind]
        name = source["secretName"] if kind == "secret" else source["name"]
        if (kind, name) not in cluster:
            continue  # e.g. the generated trainer-config ConfigMap
        data = cluster[(kind, name)]
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        local = root / volume["name"]
        local.mkdir(parents=True)
        for item in items:
            (local / item["path"]).write_text(data[item["key"]])
        for m in container["volumeMounts"]:
            if m["name"] == volume["name"]:
                out[m["mountPath"]] = local
    return out


def _local(path: str, mounts: dict[str, Path]) -> str:
    for mount, local in mounts.items():
        if path.startswith(mount + "/"):
            return str(local / path[len(mount) + 1 :])
    raise AssertionError(f"{path} is on no Secret or ConfigMap volume")


def _teacher_config(docs, mounts: dict[str, Path], model_dir: Path):
    from teacher_service.config import parse_args

    deploy = ops.find(docs, "Deployment", "teacher")
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(ops.find(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    args = [ops.expand(a, env) for a in container["args"]][1:]
    for flag in ("--auth-token-file", "--tls-cert", "--tls-key", "--tls-client-ca"):
        i = args.index(flag) + 1
        args[i] = _local(args[i], mounts)
    # Loopback, ephemeral ports, CPU and a tiny model: only the security flags are kept.
    args[args.index("--model") + 1] = f"teacher={model_dir}"
    for flag, value in (("--backend", "torch"), ("--device", "cpu"), ("--dtype", "float32"),
                        ("--host", "127.0.0.1"), ("--grpc-port", "0"), ("--http-port", "0"),
                        ("--grace-seconds", "0")):  # fmt: skip
        args[args.index(flag) + 1] = value
    return parse_args(args, env={})


def _trainer_spec(docs, mounts: dict[str, Path], namespace: str, tmp_path: Path):
    from trainer.config import parse_args

    job = ops.find(docs, "Job", "trainer")
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {"POD_NAMESPACE": namespace, "WORKER_INDEX": "0"}
    env |= {v["name"]: v["value"] for v in container["env"] if "value" in v}
    args = [ops.expand(a, env) for a in container["args"]][1:]
    config_path = tmp_path / "train.yaml"
    config_path.write_text(ops.find(docs, "ConfigMap", "trainer-config")["data"]["train.yaml"])
    args[args.index("--config") + 1] = str(config_path)
    config, _ = parse_args(args, environ={})
    [teacher] = config.teachers
    local = {
        f: _local(getattr(teacher, f), mounts)
        for f in ("token_file", "ca_cert", "client_cert", "client_key")
    }
    return dataclasses.replace(teacher, **local)


def test_production_tls_trainer_connects_to_teacher_with_mutual_tls_and_token(tmp_path: Path):
    import grpc
    from transformers import AutoTokenizer

    from teacher_service.fingerprint import tokenizer_fingerprint
    from teacher_service.random_model import save_random_model
    from teacher_service.server import serve_in_thread
    from trainer.client import ClientConfig, TeacherClient, TlsOptions
    from trainer.teacher_source import ServiceTeacher

    docs = ops.documents(ops.render_overlay("production-tls"))
    namespace = f"ns{random.randrange(10**4)}"
    cluster = _cluster(namespace, secrets.token_hex(16))
    deploy_pod = ops.find(docs, "Deployment", "teacher")["spec"]["template"]["spec"]
    job_pod = ops.find(docs, "Job", "trainer")["spec"]["template"]["spec"]
    teacher_mounts = _mount(deploy_pod, cluster, tmp_path / "teacher-pod")
    trainer_mounts = _mount(job_pod, cluster, tmp_path / "trainer-pod")
    model = tmp_path / "model"
    save_random_model(model, 64, hidden=16, layers=1, heads=2, max_positions=32, seed=0)
    server_config = _teacher_config(docs, teacher_mounts, model)
    spec = _trainer_spec(docs, trainer_mounts, namespace, tmp_path)
    [target] = spec.endpoints
    host = target.removeprefix("dns:///").rsplit(":", 1)[0]
    assert host == f"teacher-grpc.{namespace}.svc"

    with serve_in_thread(server_config) as server:
        # The pod would resolve the headless Service; here the same name is verified
        # against the certificate while dialling loopback.
        local = dataclasses.replace(spec, endpoints=(server.address,), server_name=host)
        teacher = ServiceTeacher(local, "trainer-0-1-rank0")
        try:
            fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(model))
            teacher.connect(64, fingerprint)  # handshake: mutual TLS + token accepted
        finally:
            teacher.close()
        assert teacher.vocab_size == 64
        # Without the client certificate the teacher refuses the connection.
        tls = TlsOptions(Path(spec.ca_cert), server_name=host)
        config = ClientConfig(
            endpoints=(server.address,), token=spec.bearer_token(), tls=tls, max_retries=0,
            deadline_s=5.0,
        )  # fmt: skip
        with TeacherClient(config) as client, pytest.raises(Exception) as refused:
            client.connect()
        assert getattr(refused.value, "code", None) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        ), refused.value
