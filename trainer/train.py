"""The training loop: hybrid on-policy distillation + RL of a student against teachers.

    hybrid-distill train --config configs/demo.yaml --teacher 127.0.0.1:50051
    torchrun --nproc-per-node 2 -m trainer.train --config ...      (DDP; see distributed.py)

The estimator (MATH.md § Gradient decomposition), for prompts x, G responses y ~ π_θ per
prompt, teachers q_m with weights w_m and rewards r_j with weights α_j:

    ∇_θ L = E [ Σ_t  ∇_θ KL_t(s_t)  +  ∇_θ log π_θ(y_t | s_t) · (G_t^γ − b) ]

    KL_t(s_t) = Σ_m w_m Σ_{v∈V} π_θ(v|s_t) (log π_θ(v|s_t) − log q_m(v|s_t))     (Dense)
    c_t       = Σ_m w_m (log π_θ(y_t|s_t) − log q_m(y_t|s_t))
    G_t^γ     = Σ_{k=t+1}^{T} γ^(k−t) c_k − λ_k r(x, y),   r = Σ_j α_j r_j        (Sparse)

with b the leave-one-out mean of the other samples' −λ r in the prompt's group, λ_k the
reward-weight schedule at step k, and s_t held fixed inside ∇KL_t. The Dense term runs
on a support chosen by `dense.support`: "full" (every v ∈ V; needs in-process teachers
with full logits) or a top-K set S — the student's top-K ("student", the paper's),
the teacher's ("teacher") or both ("union") — in the mode `dense.mode` (MATH.md § Top-K
Dense gradient: "sparse" is the paper's p_i (log p_i − log q_i − kl_S) on S). The loss
whose gradient is this estimator is `trainer.objective.hybrid_loss`.

One optimizer step, top to bottom:
  1. for each of `accum_steps` micro-batches: pick this rank's prompts, sample G
     responses each (keeping the student's per-step top-K ids), send them to every
     teacher (scoring starts now), score the rewards, run the student forward while the
     teachers work, wait for them, build the Dense and Sparse terms, backward;
  2. clip, AdamW step, LR schedule; 3. log, checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from teacher_service.fingerprint import tokenizer_fingerprint
from trainer import distributed
from trainer.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import (
    DenseConfig,
    OptimConfig,
    TrainConfig,
    client_id_for,
    parse_args,
    to_dict,
)
from trainer.metrics import RunLog, plot_metrics
from trainer.objective import hybrid_loss
from trainer.ops import build_support, dense_kl, teacher_logprobs_on_support, topk_kl
from trainer.ops.fused_lm_head import fused_lm_head_topk_kl
from trainer.rewards import resolve_reward, score_rewards
from trainer.rollout import Batch, ResponseLogits, sample
from trainer.student_head import ResponseHidden, lm_head
from trainer.teacher_source import TeacherOutput, open_teachers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What a finished run returns: steps completed and each step's metrics (this rank's
    view; scalars are averaged over ranks)."""

    steps: int
    history: list[dict[str, float]]
    out_dir: Path
    student: torch.nn.Module  # the trained causal LM (unwrapped from DDP)
    # step -> the prompt indices this rank trained on, one list per micro-batch (this call)
    prompts: dict[int, list[list[int]]] = field(default_factory=dict)


def load_prompts(path: str | Path) -> list[dict]:
    """JSONL rows {"prompt": [ids...], ...}."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    for i, row in enumerate(rows):
        if not row.get("prompt"):
            raise ValueError(f"{path}:{i + 1}: each line needs a non-empty 'prompt' id list")
    return rows


def prompt_indices(
    n: int, seed: int, step: int, micro: int, accum: int, rank: int, world: int, per_step: int
) -> list[int]:
    """Which prompts a (step, micro-batch, rank) trains on: consecutive slices of one
    seeded permutation per epoch. A pure function of its arguments, so a resumed run
    continues the same stream and ranks never share a slice."""
    first = ((step * accum + micro) * world + rank) * per_step
    out = []
    for i in range(first, first + per_step):
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[pos]))
    return out


def lr_factor(k: int, cfg: OptimConfig, total: int) -> float:
    """LR multiplier at step k: linear warm-up, then constant or cosine to min_lr_ratio."""
    if k < cfg.warmup_steps:
        return (k + 1) / cfg.warmup_steps
    if cfg.decay == "constant":
        return 1.0
    frac = min(1.0, (k - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def dense_term(
    logits: torch.Tensor,  # [N, V] student logits at the response rows
    mask: torch.Tensor,  # [N]
    outputs: Sequence[TeacherOutput],  # M teachers, rows flattened to N
    weights: torch.Tensor,  # [M] w_m
    student_topk: torch.Tensor,  # [N, K] student's top-K ids at sampling time
    cfg: DenseConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kl [N] differentiable, student mass P_S [N], dropped tail [N]) on the support."""
    N, V = logits.shape
    if cfg.support == "full":
        lq = torch.stack([o.full_logprobs.reshape(N, V) for o in outputs])  # [M, N, V]
        kl = dense_kl(logits, lq.to(logits.device), weights, mask)
        return kl, mask.clone(), torch.zeros_like(mask)
    support, lq = topk_support_and_teacher(N, V, outputs, student_topk, cfg)
    dev = logits.device
    res = topk_kl(logits, support.to(dev), lq.to(dev), None, weights, mask, cfg.mode)
    return res.kl, res.student_mass, res.tail


def topk_support_and_teacher(
    N: int,
    V: int,
    outputs: Sequence[TeacherOutput],  # M teachers, rows flattened to N
    student_topk: torch.Tensor,  # [N, K]
    cfg: DenseConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(support ids [N, K'] by dense.support, teachers' log q on it [M, N, K'], filled)."""
    t_ids = [o.topk_ids.reshape(N, -1) for o in outputs]  # M × [N, Kt]
    if cfg.support == "student":
        support = student_topk
    elif cfg.support == "teacher":
        support = build_support("teacher", cfg.k, teacher_topk_ids=torch.cat(t_ids, -1))
    else:  # "union": the same dedupe over the student's ids and every teacher's
        support = build_support(
            "teacher", cfg.k, teacher_topk_ids=torch.cat([student_topk, *t_ids], -1)
        )
    lq = torch.stack(
        [
            teacher_logprobs_on_support(
                support,
                V,
                ids,
                o.topk_logprobs.reshape(N, -1),
                o.leftover_logmass.reshape(N),
                query_ids=student_topk if o.query_logprobs is not None else None,
                query_logprobs=None
                if o.query_logprobs is None
                else o.query_logprobs.reshape(N, -1),
            )
            for ids, o in zip(t_ids, outputs, strict=True)
        ]
    )  # [M, N, K']
    return support, lq


def student_terms(
    out: torch.Tensor,  # [B, T, V] logits, or [B, T, d] hidden states when fused
    lm: torch.nn.Module,  # the causal LM (its head when fused)
    batch: Batch,
    outputs: Sequence[TeacherOutput],
    weights: torch.Tensor,  # [M] w_m
    cfg: DenseConfig,
    fused: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log π(y_t) [B, T], Dense kl [B, T], P_S [N], tail [N]), differentiable in the first two.

    fused: the LM head, the top-K KL and log π(y_t) in one chunked op over V
    (trainer.ops.fused_lm_head_topk_kl), so no [B·T, V] tensor exists; otherwise from
    the materialised logits (dense_term + a log-softmax)."""
    B, T = batch.mask.shape
    dev = out.device
    mask = batch.mask.to(dev).reshape(-1)
    targets = batch.targets.reshape(-1).to(dev)
    student_topk = batch.student_topk.reshape(B * T, -1)
    if fused:
        weight, bias = lm_head(lm)
        h = out.reshape(B * T, -1)
        support, lq = topk_support_and_teacher(B * T, weight.shape[0], outputs, student_topk, cfg)
        res = fused_lm_head_topk_kl(
            h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype), targets,
            support.to(dev), lq.to(dev), None, weights, mask, cfg.mode,
        )  # fmt: skip
        lp = res.token_logprob.float().reshape(B, T)
        return lp, res.kl.reshape(B, T), res.student_mass, res.tail
    logits2d = out.reshape(B * T, -1)
    kl, mass, tail = dense_term(logits2d, mask, outputs, weights, student_topk, cfg)
    lp = logits2d.float().gather(-1, targets.view(-1, 1)).squeeze(-1)
    lp = (lp - torch.logsumexp(logits2d.float(), -1)).reshape(B, T)
    return lp, kl.reshape(B, T), mass, tail


def train(config: TrainConfig) -> TrainResult:
    """Runs (or resumes) the configured training; see the module docstring."""
    run = config.run
    info = distributed.setup(run.device)
    if run.num_threads > 0:
        torch.set_num_threads(run.num_threads)
    torch.manual_seed(run.seed + info.rank)
    random.seed(run.seed + info.rank)
    out_dir = Path(run.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(config), indent=1))

    # --- models, teachers, rewards, data --------------------------------------------
    tokenizer = AutoTokenizer.from_pretrained(config.student.model_dir)
    lm = AutoModelForCausalLM.from_pretrained(config.student.model_dir, dtype=torch.float32)
    lm = lm.to(info.device).train()
    V = int(lm.config.vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    client_id = client_id_for(run, info.rank)  # the service's fairness key and metric label
    log.info("teacher client id %s", client_id)
    teachers = open_teachers(
        config.teachers, info.device, V, tokenizer_fingerprint(tokenizer), client_id
    )
    if not teachers:
        raise ValueError("no teachers configured (teachers: [...] or --teacher HOST:PORT)")
    t_weights = torch.tensor([t.spec.weight for t in teachers], device=info.device)
    reward_fns = [resolve_reward(r.fn) for r in config.rewards]
    r_weights = (
        torch.tensor([r.weight for r in config.rewards], device=info.device)
        if config.rewards
        else None
    )
    prompts = load_prompts(config.data.prompts)
    stop_meta = {"_stop_ids": tuple(config.rollout.stop_ids)}

    try:
        opt_cfg = config.optim
        optimizer = torch.optim.AdamW(
            lm.parameters(), lr=opt_cfg.lr, betas=opt_cfg.betas, weight_decay=opt_cfg.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(lr_factor, cfg=opt_cfg, total=run.steps)
        )
        start_step = 0
        if run.resume and has_checkpoint(out_dir):
            start_step = load_checkpoint(out_dir, lm, optimizer, scheduler)
            log.info("resumed from %s at step %s", out_dir, start_step)
        # The fused top-K path needs hidden states, not logits (no [B·T, V] tensor).
        fused = config.dense.fused and config.dense.support != "full"
        model = distributed.wrap(  # DDP after loading: rank 0 broadcasts
            ResponseHidden(lm) if fused else ResponseLogits(lm), info
        )

        use_bf16 = config.student.bf16 and info.device.type == "cuda"
        autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
            if use_bf16
            else contextlib.nullcontext
        )
        sampler = torch.Generator(device=info.device)
        runlog = RunLog(
            out_dir,
            enabled=info.is_main,
            total_steps=run.steps,
            start_step=start_step,
            tensorboard=run.tensorboard,
            metrics_port=run.metrics_port,
            progress=run.progress,
        )
        ro, dcfg, scfg = config.rollout, config.dense, config.sparse
        accum = opt_cfg.accum_steps
        history: list[dict[str, float]] = []
        trained_on: dict[int, list[list[int]]] = {}

        for step in range(start_step, run.steps):
            t_step = time.perf_counter()
            lam, gamma = scfg.lam(step), scfg.gamma(step)
            waited = 0.0
            sums: dict[str, float] = {}
            optimizer.zero_grad(set_to_none=True)
            for micro in range(accum):
                # 1. Rollouts: G samples per prompt from the current student, top-K ids kept.
                idx = prompt_indices(len(prompts), run.seed, step, micro, accum, info.rank,
                                     info.world_size, ro.prompts_per_step)  # fmt: skip
                trained_on.setdefault(step, []).append(idx)
                sampler.manual_seed(hash((run.seed, step, micro, info.rank)) & (2**63 - 1))
                lm.eval()  # dropout off while sampling (Llama-style students have none anyway)
                with autocast():
                    rollouts = sample(
                        lm,
                        [prompts[i]["prompt"] for i in idx],
                        [{**prompts[i], **stop_meta} for i in idx],
                        group_size=ro.group_size,
                        temperature=ro.temperature,
                        max_new_tokens=ro.max_new_tokens,
                        stop_ids=ro.stop_ids,
                        keep_topk=min(dcfg.k, V),
                        pad_id=pad_id,
                        generator=sampler,
                    )
                lm.train()
                batch: Batch = rollouts.layout(pad_id)
                B = batch.mask.shape[0]

                # 2. Teachers start scoring now; rewards and the student forward overlap them.
                query = (
                    batch.student_topk
                    if dcfg.query_student_ids and dcfg.support != "full"
                    else None
                )
                pending = [t.submit(batch, dcfg.k, query, dcfg.support == "full") for t in teachers]
                rewards = (
                    score_rewards(
                        reward_fns, rollouts.prompt_ids, rollouts.response_ids, rollouts.metas
                    )
                    if reward_fns
                    else None
                )  # [J, B]
                sync = (
                    model.no_sync()
                    if info.enabled and micro < accum - 1
                    else contextlib.nullcontext()
                )
                with sync:
                    with autocast():  # logits [B, T, V], or hidden [B, T, d] when fused
                        out = model(
                            batch.input_ids.to(info.device), batch.positions.to(info.device)
                        )
                    outputs = [p.result() for p in pending]  # the only wait on the teachers
                    waited += sum(p.waited_s for p in pending)

                    # 3. Dense term on the support and log π(y_t), then the hybrid loss.
                    mask = batch.mask.to(info.device)
                    lp, kl, mass, tail = student_terms(
                        out, lm, batch, outputs, t_weights, dcfg, fused
                    )
                    lq_tok = torch.stack([o.token_logprobs for o in outputs]).to(info.device)
                    loss, parts = hybrid_loss(
                        lp,
                        kl,
                        lq_tok,
                        mask,
                        None if rewards is None else rewards.to(info.device),
                        reward_weights=r_weights,
                        teacher_weights=t_weights,
                        gamma=gamma,
                        lam=lam,
                        kl_coef=dcfg.kl_coef,
                        group_size=ro.group_size,
                        baseline_kind=scfg.baseline,
                        normalisation=scfg.normalisation,
                        cost_clip=scfg.cost_clip,
                    )
                    (loss / accum).backward()

                # Per-micro-batch numbers, averaged over micro-batches below.
                with torch.no_grad():
                    n_tok = mask.sum().clamp_min(1.0)
                    c = (t_weights.sum() * lp - (t_weights.view(-1, 1, 1) * lq_tok).sum(0)) * mask
                    micro_vals = {k: float(v) for k, v in parts.items()}
                    micro_vals |= {
                        "kl": float(kl.sum() / n_tok),
                        "kl_sampled": float(c.sum() / n_tok),
                        "student_mass": float((mass * mask.reshape(-1)).sum() / n_tok),
                        "tail": float((tail * mask.reshape(-1)).sum() / n_tok),
                        "response_len": float(n_tok) / B,
                        "tokens": float(n_tok),
                    }
                    micro_vals["reward"] = micro_vals.pop("reward_mean")
                    if rewards is not None:
                        for spec, row in zip(config.rewards, rewards, strict=True):
                            micro_vals[f"reward/{spec.fn}"] = float(row.mean())
                for k, v in micro_vals.items():
                    sums[k] = sums.get(k, 0.0) + v / accum

            # 4. Optimizer step.
            grad_norm = torch.nn.utils.clip_grad_norm_(
                lm.parameters(), opt_cfg.grad_clip if opt_cfg.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            scheduler.step()

            # 5. Metrics (averaged over ranks), progress, checkpoint.
            step_s = time.perf_counter() - t_step
            sums |= {
                "lam": lam,
                "gamma": gamma,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "teacher_wait_frac": waited / step_s,
                "step_time_s": step_s,
            }
            values = distributed.mean_across_ranks(sums, info)
            values["tokens_per_s"] = values.pop("tokens") * accum * info.world_size / step_s
            history.append(values)
            last = step + 1 == run.steps
            if (step + 1) % max(run.log_every, 1) == 0 or last:
                runlog.log(step + 1, values)
            runlog.progress(step + 1, values)
            if info.is_main and ((run.save_every and (step + 1) % run.save_every == 0) or last):
                save_checkpoint(
                    out_dir, lm, tokenizer, optimizer, scheduler, step + 1, to_dict(config)
                )
            distributed.barrier(info)

    finally:  # teachers own threads and connections; close them on errors too
        for t in teachers:
            t.close()
    runlog.close()
    if info.is_main and run.plots and runlog.path.exists():
        plot_metrics(runlog.path, out_dir)
    distributed.teardown(info)
    return TrainResult(run.steps, history, out_dir, lm, trained_on)


def main(argv: list[str] | None = None) -> int:
    """`hybrid-distill train`: parse the config and flags, train, return an exit code."""
    config, _ = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.info("config: %s", json.dumps(to_dict(config)))  # tokens redacted
    train(config)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
