"""Hybrid distillation with TRL: the student trains with TRL's GRPO machinery against a
teacher service, on the demo task.

    accelerate launch --num_processes 2 examples/trl_hybrid_distill.py \
        --config examples/trl_demo.yaml --teacher 127.0.0.1:50051 [--set grpo.max_steps=50]

One process per device (accelerate: DDP, DeepSpeed or FSDP from `accelerate config`);
each rank generates with TRL (HF generate, or vLLM with `grpo.use_vllm: true`), sends its
rollouts to the teachers with its own client id, and minimises the hybrid loss
(trainer/integrations/trl_trainer.py). The config file is documented in
examples/trl_demo.yaml; `--set a.b=VALUE` overrides one key (VALUE is YAML), `--teacher`
points every teacher at the given endpoints, `--student` replaces the student directory.
Rank 0 writes <grpo.output_dir>/metrics.jsonl (reward, KL, student mass, tail, teacher wait).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
from pathlib import Path
from typing import Any

import yaml
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import GRPOConfig

from trainer.config import DenseConfig, SparseConfig, TeacherSpec, from_dict
from trainer.demo.task import TaskSpec, make_example
from trainer.integrations.trl_rewards import trl_reward
from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer


def demo_dataset(tokenizer: PreTrainedTokenizerBase, spec: TaskSpec, n: int, seed: int) -> Dataset:
    """n demo prompts: "prompt" as text (TRL tokenizes it back to the same ids), and the
    "prompt_ids" and "answer" columns the project's rewards read."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ex = make_example(rng, spec)
        text = " ".join(tokenizer.convert_ids_to_tokens(ex["prompt"]))
        rows.append({"prompt": text, "prompt_ids": ex["prompt"], "answer": ex["answer"]})
    return Dataset.from_list(rows)


def load(path: Path, sets: list[str]) -> dict[str, Any]:
    """The YAML config with each `a.b=VALUE` override applied (VALUE parsed as YAML)."""
    cfg = yaml.safe_load(path.read_text()) or {}
    for item in sets:
        dotted, eq, raw = item.partition("=")
        if not eq:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        *parents, leaf = dotted.split(".")
        node = cfg
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(raw)
    return cfg


def build_trainer(cfg: dict[str, Any]) -> HybridGRPOTrainer:
    """The TRL trainer a config describes (the few lines a TRL GRPO user changes)."""
    student = cfg["student"]
    tokenizer = AutoTokenizer.from_pretrained(student)
    task = dict(cfg.get("task", {}))
    n, seed = int(task.pop("prompts", 1000)), int(task.pop("seed", 1))
    dataset = demo_dataset(tokenizer, TaskSpec(**task), n, seed)
    rewards = cfg["rewards"]
    hybrid = HybridConfig(
        teachers=tuple(from_dict(TeacherSpec, t, "teachers") for t in cfg["teachers"]),
        dense=from_dict(DenseConfig, cfg.get("dense", {}), "dense"),
        sparse=from_dict(SparseConfig, cfg.get("sparse", {}), "sparse"),
        client_id=str(cfg.get("client_id", "")),
        metrics_port=int(cfg.get("metrics_port", 0)),
    )
    args = GRPOConfig(**cfg["grpo"], reward_weights=[float(r["weight"]) for r in rewards])
    return HybridGRPOTrainer(
        model=student,
        reward_funcs=[trl_reward(r["fn"]) for r in rewards],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        hybrid=hybrid,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--teacher", action="append", default=[], metavar="HOST:PORT",
                        help="endpoints for every teacher (repeat for replicas)")  # fmt: skip
    parser.add_argument("--student", help="student model directory (overrides the config)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    cfg = load(args.config, args.set)
    if args.student:
        cfg["student"] = args.student
    if args.teacher:
        cfg["teachers"] = [
            dataclasses.asdict(
                dataclasses.replace(from_dict(TeacherSpec, t), endpoints=tuple(args.teacher))
            )
            for t in cfg["teachers"]
        ]
    trainer = build_trainer(cfg)
    trainer.train()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
