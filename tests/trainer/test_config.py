"""The trainer config: YAML file -> frozen dataclasses, CLI flags override, errors name keys."""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import pytest

from trainer.config import (
    AUTH_TOKEN_ENV,
    REDACTED,
    TeacherSpec,
    TrainConfig,
    client_id_for,
    load_config,
    parse_args,
    to_dict,
)

YAML = """
run: {out_dir: runs/x, steps: %(steps)d}
student: {model_dir: /m/student}
data: {prompts: /d/p.jsonl}
rollout: {group_size: %(group)d, stop_ids: [2, 7]}
teachers:
  - {name: a, weight: 0.25, endpoints: ["127.0.0.1:1"]}
  - {name: b, weight: 0.75, endpoints: ["127.0.0.1:2"], teacher: big}
dense: {support: union, k: %(k)d, mode: renorm}
sparse: {gamma: 0.5, lam: {kind: linear, start: 0.0, end: 2.0, steps: 10}}
rewards: [{fn: exact_match, weight: 2.0}, {fn: "pkg.mod:fn"}]
optim: {lr: 3e-4, betas: [0.8, 0.9]}
"""


def _write(tmp_path: Path, rng: random.Random) -> tuple[Path, dict]:
    values = {
        "steps": rng.randrange(1, 1000),
        "group": rng.randrange(2, 9),
        "k": rng.randrange(1, 65),
    }
    path = tmp_path / "c.yaml"
    path.write_text(YAML % values)
    return path, values


def test_file_maps_onto_frozen_dataclasses(tmp_path: Path, seed: int) -> None:
    path, v = _write(tmp_path, random.Random(seed))
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    assert config.run.steps == v["steps"] and config.rollout.group_size == v["group"]
    assert config.dense.k == v["k"] and config.dense.mode == "renorm"
    assert config.rollout.stop_ids == (2, 7)
    assert [t.weight for t in config.teachers] == [0.25, 0.75]
    assert config.teachers[1].teacher == "big" and config.teachers[1].endpoints == ("127.0.0.1:2",)
    assert config.optim.lr == pytest.approx(3e-4)  # YAML reads "3e-4" as a string
    assert config.optim.betas == (0.8, 0.9)
    assert config.sparse.lam(5) == pytest.approx(1.0)
    assert config.sparse.gamma(0) == config.sparse.gamma(10**6) == 0.5  # a number: constant
    assert [r.fn for r in config.rewards] == ["exact_match", "pkg.mod:fn"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.run.steps = 3  # type: ignore[misc]


def test_cli_flags_override_the_file(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    path, _ = _write(tmp_path, rng)
    steps, lr = rng.randrange(1, 99), rng.uniform(1e-5, 1e-2)
    config, _ = parse_args(
        ["--config", str(path), "--run.steps", str(steps), f"--optim.lr={lr!r}",
         "--rollout.group-size", "3", "--sparse.lam.end", "4.0", "--dense.support", "student"]
    )  # fmt: skip
    assert config.run.steps == steps and config.optim.lr == pytest.approx(lr)
    assert config.rollout.group_size == 3 and config.sparse.lam.end == 4.0
    assert config.dense.support == "student"
    assert config.dense.k == load_config(path).dense.k  # untouched fields keep the file's


def test_teacher_shortcut_points_every_teacher_at_the_endpoint(tmp_path: Path) -> None:
    path, _ = _write(tmp_path, random.Random(0))
    config, _ = parse_args(["--config", str(path), "--teacher", "10.0.0.1:9"])
    assert [t.endpoints for t in config.teachers] == [("10.0.0.1:9",), ("10.0.0.1:9",)]
    assert [t.weight for t in config.teachers] == [0.25, 0.75]
    bare, _ = parse_args(["--teacher", "h:1", "--teacher", "h:2"])
    assert bare.teachers[0].endpoints == ("h:1", "h:2")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr", "1"], "unknown flag --optim.lrr"),
        (["--dense.mode", "dense"], "config.dense.mode: must be one of"),
        (["--rollout.group_size", "2.5"], "expected an integer"),
        (["--run.resume", "maybe"], "expected true/false"),
        (["--dense.support", "full", "--teacher", "h:1"], "needs full teacher logits"),
        (["--sparse.gamma", "1.5"], "sparse.gamma.start must be in [0, 1], got 1.5"),
    ],
)
def test_bad_values_fail_naming_the_key(argv: list[str], message: str, capsys) -> None:
    with pytest.raises((ValueError, SystemExit)) as info:
        parse_args(argv)
    text = str(info.value) + capsys.readouterr().err
    assert message in text


def test_unknown_file_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ValueError, match=r"config.optim: unknown keys \['learning_rate'\]"):
        load_config(path)


# --- deployment options: client id, token sources, TLS ---------------------------------


def test_run_client_id_flag_and_placeholders(seed: int) -> None:
    rng = random.Random(seed)
    name = f"exp{rng.randrange(10**6)}"
    config, _ = parse_args(["--teacher", "h:1", "--run.client-id", f"{name}-{{rank}}"], environ={})
    rank = rng.randrange(64)
    assert client_id_for(config.run, rank) == f"{name}-{rank}"
    with pytest.raises(ValueError, match=r"config\.run\.client_id: expected a string"):
        parse_args(["--run.client-id", "{host}"], environ={})  # YAML reads it as a mapping


def test_env_token_fills_only_teachers_without_token_or_token_file(seed: int) -> None:
    env_token = f"{random.Random(seed).getrandbits(64):016x}"
    teachers = (
        "[{name: a, endpoints: ['h:1']}, {name: b, endpoints: ['h:2'], token: mine},"
        " {name: c, endpoints: ['h:3'], token_file: /run/t}, {name: d, model_dir: /m}]"
    )
    config, _ = parse_args(["--teachers", teachers], environ={AUTH_TOKEN_ENV: env_token + "\n"})
    assert [t.token for t in config.teachers] == [env_token, "mine", "", ""]
    assert [t.token_file for t in config.teachers] == ["", "", "/run/t", ""]
    bare, _ = parse_args(["--teacher", "h:1"], environ={})
    assert bare.teachers[0].bearer_token() is None


def test_tokens_never_reach_repr_or_the_run_record(seed: int) -> None:
    token = f"{random.Random(seed).getrandbits(128):032x}"
    config = TrainConfig(teachers=(TeacherSpec(endpoints=("h:1",), token=token),))
    assert token not in repr(config)
    assert to_dict(config)["teachers"][0]["token"] == REDACTED
    assert config.teachers[0].bearer_token() == token  # the config itself keeps it


def test_token_file_is_read_stripped_and_bad_files_name_the_teacher(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret\n")
    assert (
        TeacherSpec(name="x", endpoints=("h:1",), token_file=str(path)).bearer_token() == "s3cret"
    )
    path.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(f"teacher 'x': token_file {path} is empty")):
        TeacherSpec(name="x", endpoints=("h:1",), token_file=str(path)).bearer_token()
    with pytest.raises(ValueError, match=r"teacher 'x': token_file: .*No such file"):
        TeacherSpec(name="x", endpoints=("h:1",), token_file=str(tmp_path / "no")).bearer_token()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"endpoints": ("h:1",), "token": "a", "token_file": "/t"}, "token or token_file"),
        ({"endpoints": ("h:1",), "client_cert": "/c"}, "client_cert and client_key"),
        ({"endpoints": ("h:1",), "client_key": "/k"}, "client_cert and client_key"),
        ({"model_dir": "/m", "ca_cert": "/ca"}, "apply to service teachers"),
        ({"model_dir": "/m", "token": "a"}, "apply to service teachers"),
    ],
)
def test_bad_security_settings_fail_naming_the_teacher(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TeacherSpec(name="x", **fields)


def test_tls_is_on_when_asked_or_when_any_tls_path_is_set() -> None:
    assert not TeacherSpec(endpoints=("h:1",)).uses_tls
    assert TeacherSpec(endpoints=("h:1",), tls=True).uses_tls
    for f in ("ca_cert", "server_name"):
        assert TeacherSpec(endpoints=("h:1",), **{f: "x"}).uses_tls
    assert TeacherSpec(endpoints=("h:1",), client_cert="c", client_key="k").uses_tls


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_resolve_interval_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match=r"teacher 'x': resolve_interval_s must be finite and > 0"):
        TeacherSpec(name="x", endpoints=("dns:///teacher:50051",), resolve_interval_s=bad)


def test_resolve_interval_reaches_the_client(seed: int) -> None:
    from trainer.teacher_source import ServiceTeacher

    interval = 1.0 + seed % 97
    spec = TeacherSpec(name="x", endpoints=("dns:///teacher:50051",), resolve_interval_s=interval)
    teacher = ServiceTeacher(spec, client_id="c")
    try:
        assert teacher._client.config.resolve_interval_s == interval
    finally:
        teacher.close()


def test_gamma_schedule_from_the_file_and_its_bounds(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    at = rng.randrange(1, 500)
    path, _ = _write(tmp_path, rng)
    text = path.read_text().replace(
        "gamma: 0.5", f"gamma: {{kind: step, start: 0, end: 1, steps: {at}}}"
    )
    path.write_text(text)
    gamma = load_config(path).sparse.gamma
    assert (gamma(at - 1), gamma(at), gamma(10 * at)) == (0.0, 1.0, 1.0)
    path.write_text(text.replace("end: 1,", "end: 1.25,"))
    with pytest.raises(ValueError, match=r"sparse.gamma.end must be in \[0, 1\], got 1.25"):
        load_config(path)
