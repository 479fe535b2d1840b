"""The trainer's configuration: one frozen dataclass tree, from a YAML file plus CLI flags.

    hybrid-distill train --config configs/demo.yaml --optim.lr 3e-4 --rollout.group-size 8

Every leaf field of `TrainConfig` is also a flag `--section.field VALUE` (dashes or
underscores); values are parsed as YAML, so `--rollout.stop-ids "[2]"` and
`--teachers "[{name: t, endpoints: ['127.0.0.1:50051']}]"` work. `--teacher HOST:PORT`
is a shortcut that points every teacher at one service endpoint. Unknown keys in the
file or on the command line are errors that name the key: a typo never silently keeps
a default. `main()` builds the config once and passes it down (DESIGN § Style 6).

This module is the trainer's one reader of the environment: `parse_args` takes the
teacher service's bearer token from `HYBRID_DISTILL_AUTH_TOKEN` for service teachers
that set neither `token` nor `token_file`, and `client_id_for` reads `HOSTNAME` for the
default client id. Tokens never reach logs or run records: `repr` hides them and
`to_dict` redacts them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import socket
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from trainer.schedules import LambdaSchedule

Support = Literal["full", "student", "teacher", "union"]

AUTH_TOKEN_ENV = "HYBRID_DISTILL_AUTH_TOKEN"  # the same variable the server reads
DEFAULT_CLIENT_ID = "{host}-{pid}-rank{rank}"
REDACTED = "<redacted>"


@dataclass(frozen=True)
class RunConfig:
    """Where and how long: output directory, steps, logging, checkpoints, device."""

    out_dir: str = "runs/train"
    seed: int = 0
    steps: int = 100
    log_every: int = 1  # JSONL/TensorBoard/Prometheus every N steps (the bar: every step)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    resume: bool = True  # continue from out_dir/checkpoint if it exists
    device: str = "auto"  # "auto" = cuda when available, else cpu
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    metrics_port: int = 0  # Prometheus gauges on this port (rank 0); 0 = off
    tensorboard: bool = False  # also write TensorBoard events (needs `tensorboard`)
    progress: bool = True  # tqdm progress bar on rank 0
    plots: bool = True  # PNG plots of reward and KL at the end
    # x-client-id sent to the teacher service: its fair-queue key and the "client" label
    # of teacher_service_client_tokens_total. "{host}", "{pid}" and "{rank}" are filled
    # in (client_id_for); "" = DEFAULT_CLIENT_ID, unique per process and rank.
    client_id: str = ""


@dataclass(frozen=True)
class StudentConfig:
    """The student: a local Hugging Face causal-LM directory (config, weights, tokenizer)."""

    model_dir: str = ""
    bf16: bool = True  # bf16 autocast for the student forward on CUDA (ignored on CPU)


@dataclass(frozen=True)
class DataConfig:
    """Prompts: a JSONL file, one {"prompt": [ids...], ...} per line. The other keys of a
    line reach the rewards as `meta` (e.g. the demo's "answer")."""

    prompts: str = ""


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling G responses per prompt from the current student."""

    prompts_per_step: int = 8  # per rank and per micro-batch
    group_size: int = 4  # G samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 32
    stop_ids: tuple[int, ...] = (2,)  # a response ends with (and includes) one of these


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher q_m with weight w_m. Exactly one of model_dir (in-process, full logits)
    or endpoints (the teacher service, top-K) is set.

    Service teachers authenticate with a bearer token: `token`, or the content of
    `token_file` (read when the trainer connects; never both), or else the
    HYBRID_DISTILL_AUTH_TOKEN environment variable (filled in by `parse_args`). TLS is on
    when `tls` or any of the TLS paths is set; `ca_cert` "" uses the system roots,
    `client_cert` + `client_key` present a client certificate (mutual TLS), and
    `server_name` verifies the server's certificate against that name instead of the
    endpoint's host.
    """

    name: str = "teacher"
    weight: float = 1.0
    model_dir: str = ""
    endpoints: tuple[str, ...] = ()
    teacher: str = ""  # hosted teacher name on the service; "" = its default
    token: str = field(default="", repr=False)  # bearer token; "" = token_file / env / none
    token_file: str = ""  # file holding the bearer token (e.g. a mounted Secret)
    tls: bool = False
    ca_cert: str = ""  # PEM roots that sign the server's certificate
    client_cert: str = ""  # PEM client certificate chain (mutual TLS)
    client_key: str = ""  # PEM client private key (mutual TLS)
    server_name: str = ""  # name the server's certificate must carry, if not the host
    deadline_s: float = 60.0
    # dns:///name:port endpoints are resolved again this often (new replicas get load)
    resolve_interval_s: float = 10.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.resolve_interval_s) and self.resolve_interval_s > 0):
            raise ValueError(
                f"teacher {self.name!r}: resolve_interval_s must be finite and > 0, "
                f"got {self.resolve_interval_s}"
            )
        if bool(self.model_dir) == bool(self.endpoints):
            raise ValueError(
                f"teacher {self.name!r}: set exactly one of model_dir (in-process) "
                "or endpoints (teacher service)"
            )
        service_only = ("token", "token_file", "tls", "ca_cert", "client_cert", "client_key",
                        "server_name")  # fmt: skip
        if self.model_dir and any(getattr(self, f) for f in service_only):
            raise ValueError(
                f"teacher {self.name!r}: {', '.join(service_only)} apply to service teachers "
                "(endpoints), not to an in-process model_dir"
            )
        if self.token and self.token_file:
            raise ValueError(f"teacher {self.name!r}: set token or token_file, not both")
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError(
                f"teacher {self.name!r}: client_cert and client_key must be given together"
            )

    @property
    def uses_tls(self) -> bool:
        return self.tls or any((self.ca_cert, self.client_cert, self.client_key, self.server_name))

    def bearer_token(self) -> str | None:
        """The token to send: `token`, else `token_file`'s content (surrounding whitespace
        dropped), else None. Raises ValueError naming the teacher and the file when it
        cannot be read or is empty."""
        if self.token:
            return self.token
        if not self.token_file:
            return None
        try:
            token = Path(self.token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"teacher {self.name!r}: token_file: {exc}") from exc
        if not token:
            raise ValueError(f"teacher {self.name!r}: token_file {self.token_file} is empty")
        return token


@dataclass(frozen=True)
class DenseConfig:
    """The Dense term Σ_t ∇KL_t (MATH.md § Top-K Dense gradient)."""

    support: Support = "union"  # "full" needs in-process teachers (full logits)
    k: int = 16  # student top-K width, and the teacher's top-K width requested
    mode: Literal["sparse", "exact", "renorm"] = "sparse"
    kl_coef: float = 1.0  # β: weight of the KL part of the objective; 0 = pure RL
    query_student_ids: bool = True  # ask the teacher for log q at the student's top-K ids
    # Top-K supports: the fused LM-head op from hidden states (no [B·T, V] logits); false =
    # materialised logits + topk_kl (the unfused path, kept as an option and test oracle).
    fused: bool = True


@dataclass(frozen=True)
class SparseConfig:
    """The Sparse term ∇log π(y_t|s_t)·(G_t^γ − b).

    `gamma` and `lam` are a number (constant) or a schedule over the training step
    (trainer/schedules.py). γ must stay in [0, 1]; only γ = 1 is unbiased for L
    (MATH.md § Future return), so a γ schedule that ends at 1 is unbiased from then on.
    """

    gamma: LambdaSchedule = field(default_factory=LambdaSchedule)
    lam: LambdaSchedule = field(default_factory=LambdaSchedule)
    # loo / loo_position / none are unbiased; mean_std, std_position are biased
    # (trainer/objective.py group_advantages; test_theorem1.py proves both).
    baseline: Literal["loo", "loo_position", "mean_std", "std_position", "none"] = "loo"
    normalisation: Literal["sequence", "token"] = "sequence"
    cost_clip: float | None = None  # clip each c_t in the future returns (biased)

    def __post_init__(self) -> None:
        if isinstance(self.gamma, int | float):  # SparseConfig(gamma=0.5): a constant
            object.__setattr__(self, "gamma", LambdaSchedule.from_config(self.gamma))
        if isinstance(self.lam, int | float):
            object.__setattr__(self, "lam", LambdaSchedule.from_config(self.lam))
        # Every kind stays between start and end (exp is clamped at end), so bounding
        # both bounds γ(k) for every step.
        for name, value in (("start", self.gamma.start), ("end", self.gamma.end)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"sparse.gamma.{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class RewardSpec:
    """One reward r_j with weight α_j: a built-in name or "package.module:function"."""

    fn: str = "exact_match"
    weight: float = 1.0


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, a linear warm-up then constant or cosine LR, gradient clipping, accumulation."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    accum_steps: int = 1  # micro-batches per optimizer step
    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"  # after warm-up, to min_lr_ratio·lr
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    """Everything one trainer process needs; built in main() and passed down."""

    run: RunConfig = field(default_factory=RunConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teachers: tuple[TeacherSpec, ...] = ()
    dense: DenseConfig = field(default_factory=DenseConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    rewards: tuple[RewardSpec, ...] = ()
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        if self.dense.support == "full" and any(t.endpoints for t in self.teachers):
            raise ValueError(
                "dense.support 'full' needs full teacher logits: use in-process teachers "
                "(model_dir), or a top-K support (student, teacher, union) with the service"
            )
        grouped = ("loo", "loo_position", "std_position")
        if self.sparse.baseline in grouped and self.rollout.group_size < 2:
            raise ValueError(
                f"sparse.baseline {self.sparse.baseline!r} needs rollout.group_size >= 2"
            )


# ---------------------------------------------------------------------------------------
# Building a config from plain data


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Turns YAML data into the annotated type `tp`, naming `where` in any error."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            if tp is LambdaSchedule and isinstance(value, int | float):
                return LambdaSchedule.from_config(value)
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ValueError(f"{where}: must be one of {list(get_args(tp))}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, where)
    if origin is tuple:
        if not isinstance(value, Sequence) or isinstance(value, str):
            value = [value]
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {list(value)}")
        return tuple(
            _coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float):
        if tp is float and isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if tp is int and float(value) != int(value):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return tp(value)
    if tp is str:
        if isinstance(value, Mapping | list):  # e.g. an unquoted "{host}-x" read as YAML
            raise ValueError(f"{where}: expected a string, got {value!r} (quote it)")
        return "" if value is None else str(value)
    raise TypeError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type, data: Mapping[str, Any], where: str = "config") -> Any:
    """Builds dataclass `cls` from a mapping; unknown keys are an error."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (for the run's config.json, checkpoints and logs); tokens redacted."""
    data = dataclasses.asdict(config)
    for teacher in data.get("teachers", ()):
        if teacher.get("token"):
            teacher["token"] = REDACTED
    return data


def with_env_token(config: TrainConfig, environ: Mapping[str, str]) -> TrainConfig:
    """Gives HYBRID_DISTILL_AUTH_TOKEN (stripped) to every service teacher that has
    neither `token` nor `token_file`; an explicit setting always wins."""
    token = environ.get(AUTH_TOKEN_ENV, "").strip()
    if not token:
        return config
    teachers = tuple(
        dataclasses.replace(t, token=token) if t.endpoints and not (t.token or t.token_file) else t
        for t in config.teachers
    )
    return dataclasses.replace(config, teachers=teachers)


def client_id_for(run: RunConfig, rank: int, environ: Mapping[str, str] | None = None) -> str:
    """The x-client-id of this process and rank: `run.client_id` (or DEFAULT_CLIENT_ID)
    with "{host}" (HOSTNAME, else the system host name; in Kubernetes the pod's host
    name, `<job>-<index>` for an Indexed Job), "{pid}" and "{rank}" filled in."""
    env = os.environ if environ is None else environ
    host = env.get("HOSTNAME") or socket.gethostname()
    return (
        (run.client_id or DEFAULT_CLIENT_ID)
        .replace("{host}", host)
        .replace("{pid}", str(os.getpid()))
        .replace("{rank}", str(rank))
    )


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Reads a YAML file (or nothing) and applies dotted overrides {"optim.lr": 1e-3}."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the config file must be a mapping of sections")
        data = loaded
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {dotted}: {key} is not a section")
        node[leaf] = value
    return from_dict(TrainConfig, data)


def _leaf_flags() -> dict[str, str]:
    """{"--optim.lr": "optim.lr", "--optim.grad-clip": "optim.grad_clip", "--teachers": ...}."""
    flags: dict[str, str] = {}
    hints = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = get_type_hints(tp)
            for g in dataclasses.fields(tp):
                dotted = f"{f.name}.{g.name}"
                flags[f"--{dotted}"] = dotted
                flags[f"--{dotted.replace('_', '-')}"] = dotted
                if dataclasses.is_dataclass(sub[g.name]):  # e.g. sparse.lam.start
                    for h in dataclasses.fields(sub[g.name]):
                        d3 = f"{dotted}.{h.name}"
                        flags[f"--{d3}"] = d3
                        flags[f"--{d3.replace('_', '-')}"] = d3
        else:
            flags[f"--{f.name}"] = f.name
    return flags


def parse_args(
    argv: Sequence[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[TrainConfig, argparse.Namespace]:
    """CLI + environment (os.environ unless given) -> (TrainConfig, the non-config flags)."""
    defaults = to_dict(TrainConfig())
    listing = []
    for dotted in sorted({v for v in _leaf_flags().values()}):
        value: Any = defaults
        for part in dotted.split("."):
            value = value[part]
        listing.append(f"  --{dotted} (default {value!r})")
    parser = argparse.ArgumentParser(
        prog="hybrid-distill train",
        description="Hybrid on-policy distillation + RL against a teacher service. Any config "
        "field is a flag: --section.field VALUE (YAML-parsed), e.g. --optim.lr 3e-4.",
        epilog="config flags:\n" + "\n".join(listing),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument(
        "--teacher", action="append", default=[], metavar="HOST:PORT",
        help="point every teacher at this service endpoint (repeat for replicas)",
    )  # fmt: skip
    known, rest = parser.parse_known_args(argv)
    flags = _leaf_flags()
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        arg = rest[i]
        name, eq, inline = arg.partition("=")
        if name not in flags:
            parser.error(f"unknown flag {name}; config flags look like --optim.lr")
        if eq:
            raw = inline
            i += 1
        elif i + 1 < len(rest):
            raw = rest[i + 1]
            i += 2
        else:
            parser.error(f"{name} needs a value")
        overrides[flags[name]] = yaml.safe_load(raw)
    config = load_config(known.config, overrides)
    if known.teacher:
        teachers = config.teachers or (TeacherSpec(endpoints=tuple(known.teacher)),)
        config = dataclasses.replace(
            config,
            teachers=tuple(
                dataclasses.replace(t, model_dir="", endpoints=tuple(known.teacher))
                for t in teachers
            ),
        )
    return with_env_token(config, os.environ if environ is None else environ), known
