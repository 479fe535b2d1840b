"""Offline distillation, the grid's non-on-policy baseline: the student learns from the
teacher's own samples.

Each step samples G responses per prompt from the *teacher* at temperature 1 (the same
prompts per step, G and steps as the on-policy methods, so the teacher produces about as
many tokens as the on-policy teacher scores) and takes an AdamW step on the token-level
forward KL on those samples (word-level knowledge distillation, GKD's "supervised KD"):

    loss = mean over sequences of Σ_t Σ_v q(v|s_t) (log q(v|s_t) − log π_θ(v|s_t)),
    s_t = (x, y_<t),  y ~ q

With the teacher in-process its full distribution is at hand; the teacher tokens counted
are the tokens it generated. This is not the hybrid objective (trainer/objective.py,
trained only by trainer/train.py); it is the one extra training step the comparison needs.

To be measured like the on-policy methods, every step also samples the *student* on the
same prompts (not trained on) and logs its reward and the sampled-token KL estimate
mean_t (log π − log q)(y_t), y ~ π_θ (the trainer's `kl_sampled`), to
<run.out_dir>/metrics.jsonl as the step ends.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from trainer.config import TrainConfig
from trainer.metrics import RunLog
from trainer.rewards import resolve_reward, score_rewards
from trainer.rollout import ResponseLogits, sample
from trainer.train import load_prompts, lr_factor, prompt_indices


@dataclass(frozen=True)
class OfflineConfig:
    """Knobs of the offline step that the trainer config does not have."""

    teacher_temperature: float = 1.0


@dataclass(frozen=True)
class OfflineResult:
    history: list[dict[str, float]]
    student: torch.nn.Module


def _lm(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def train_offline(config: TrainConfig, off: OfflineConfig) -> OfflineResult:
    """Offline distillation with `config`'s student, first teacher, data, rollout sizes,
    rewards and optimizer; see the module docstring."""
    run, ro, opt_cfg = config.run, config.rollout, config.optim
    if run.num_threads > 0:
        torch.set_num_threads(run.num_threads)
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    student = _lm(config.student.model_dir).train()
    teacher = _lm(config.teachers[0].model_dir).eval()
    prompts = load_prompts(config.data.prompts)
    fns = [resolve_reward(r.fn) for r in config.rewards]
    weights = torch.tensor([r.weight for r in config.rewards])
    stop_meta = {"_stop_ids": tuple(ro.stop_ids)}
    optimizer = torch.optim.AdamW(student.parameters(), lr=opt_cfg.lr, betas=opt_cfg.betas,
                                  weight_decay=opt_cfg.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, cfg=opt_cfg, total=run.steps)
    )
    gen = torch.Generator()
    s_fwd, t_fwd = ResponseLogits(student), ResponseLogits(teacher)
    common = dict(group_size=ro.group_size, max_new_tokens=ro.max_new_tokens,
                  stop_ids=ro.stop_ids, keep_topk=1, pad_id=0, generator=gen)  # fmt: skip
    history: list[dict[str, float]] = []
    # The same sinks as the on-policy loop (metrics.jsonl under run.out_dir, tqdm when
    # run.progress): a long offline run shows where it is before it ends.
    runlog = RunLog(run.out_dir, enabled=True, total_steps=run.steps, progress=run.progress)
    for step in range(run.steps):
        idx = prompt_indices(len(prompts), run.seed, step, 0, 1, 0, 1, ro.prompts_per_step)
        xs = [prompts[i]["prompt"] for i in idx]
        metas = [{**prompts[i], **stop_meta} for i in idx]
        gen.manual_seed(hash((run.seed, step)) & (2**63 - 1))

        # 1. Teacher samples and the forward-KL step on them.
        t_roll = sample(teacher, xs, metas, temperature=off.teacher_temperature, **common)
        tb = t_roll.layout(0)
        with torch.no_grad():
            lq = torch.log_softmax(t_fwd(tb.input_ids, tb.positions).float(), -1)  # [B, T, V]
        lp = torch.log_softmax(s_fwd(tb.input_ids, tb.positions).float(), -1)
        fkl = (lq.exp() * (lq - lp)).sum(-1)  # [B, T]
        loss = (fkl * tb.mask).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt_cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), opt_cfg.grad_clip)
        optimizer.step()
        scheduler.step()

        # 2. Measurement only: the student's own samples, their reward and sampled KL.
        with torch.no_grad():
            student.eval()
            s_roll = sample(student, xs, metas, temperature=ro.temperature, **common)
            student.train()
            sb = s_roll.layout(0)
            r = score_rewards(fns, s_roll.prompt_ids, s_roll.response_ids, s_roll.metas)
            ls = torch.log_softmax(s_fwd(sb.input_ids, sb.positions).float(), -1)
            lt = torch.log_softmax(t_fwd(sb.input_ids, sb.positions).float(), -1)
            tok = sb.targets.unsqueeze(-1)
            c = (ls.gather(-1, tok) - lt.gather(-1, tok)).squeeze(-1) * sb.mask
            n_tok = sb.mask.sum().clamp_min(1.0)
        history.append(
            {
                "loss": float(loss.detach()),
                "forward_kl": float((fkl.detach() * tb.mask).sum() / tb.mask.sum().clamp_min(1.0)),
                "reward": float((weights.unsqueeze(-1) * r).sum(0).mean()),
                "kl_sampled": float(c.sum() / n_tok),
                "response_len": float(n_tok) / sb.mask.shape[0],
                "teacher_tokens": float(tb.mask.sum()),
            }
        )
        runlog.log(step + 1, history[-1])
        runlog.progress(step + 1, history[-1])
    runlog.close()
    return OfflineResult(history, student.eval())
