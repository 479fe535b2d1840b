"""The trainer config: YAML file -> frozen dataclasses, CLI flags override, errors name keys."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from trainer.config import TrainConfig, load_config, parse_args

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
