"""TRL's GRPO trainer with the hybrid objective and the shared teacher service.

    from trl import GRPOConfig
    from trainer.config import TeacherSpec
    from trainer.integrations.trl_trainer import HybridConfig, HybridGRPOTrainer

    trainer = HybridGRPOTrainer(
        model="path/to/student", reward_funcs=[my_reward], args=GRPOConfig(...),
        train_dataset=dataset,
        hybrid=HybridConfig(teachers=(TeacherSpec(endpoints=("teacher:50051",)),)),
    )
    trainer.train()

TRL keeps what it is good at: the data loader, generation (HF `generate` on CPU, vLLM
colocate or server on GPU), reward functions, accelerate (DDP, DeepSpeed, FSDP),
checkpoints and logging. This class replaces GRPO's loss with the estimator of
MATH.md, the same one the built-in loop (trainer/train.py) minimises:

    ∇_θ L = E [ Σ_t  ∇_θ KL_t(s_t)  +  ∇_θ log π_θ(y_t | s_t) · (G_t^γ − b) ]

Per generation batch (on each rank, TRL's `_generate_and_score_completions`):
  1. after TRL generates, the rollouts go to every teacher at once (one request per
     sequence, this rank's client id), with the student's top-K ids (one no-grad
     forward) as query ids; TRL's reward functions run while the teachers score;
  2. costs c_t, future returns G_t^γ and the baseline b (trainer/objective.py; λ from the
     λ schedule at the optimizer step) are computed per group of G completions, and the
     Dense support S with the teacher log-probs on it (trl_layout.py);
then per micro-batch (`compute_loss`), inside the DDP/FSDP/DeepSpeed wrapper's forward:
  3. the student's hidden states at the response rows go through the fused LM-head op
     (trainer/ops/fused_lm_head.py: top-K KL, log π(y_t), P_S and the tail, never [N, V]
     logits), and loss = β·normalise(KL_t) + normalise(log π(y_t)·sg(G_t^γ − b)).

Why GRPOTrainer and not TRL's DistillationTrainer: the hybrid objective needs groups of
G completions per prompt (the baselines), task rewards and their weights, and per-group
advantages, which GRPOTrainer already produces and distributes; DistillationTrainer has
no rewards and expects a teacher model (or logits server) of its own.

Constraints, checked at construction with the field named: `args.beta` 0 (the KL term
is the teacher's, not a reference model's), `args.num_iterations` 1 and
`args.gradient_accumulation_steps` a multiple of `steps_per_generation` (the estimator is
on-policy: every rollout is used once, before the weights it was sampled with change),
and each rank's generation batch a whole number of groups. Metrics go to TRL's logging
under `hybrid/` and, on rank 0, to <output_dir>/metrics.jsonl and the Prometheus gauges
of trainer/metrics.py when `HybridConfig.metrics_port` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOTrainer
from trl.models.utils import _ForwardRedirection, unwrap_model_for_generation

from teacher_service.fingerprint import tokenizer_fingerprint
from trainer.client import TeacherError
from trainer.config import DenseConfig, RunConfig, SparseConfig, TeacherSpec, client_id_for
from trainer.integrations.trl_layout import (
    dense_support,
    rollout_batch,
    student_topk_and_logprobs,
)
from trainer.metrics import RunLog
from trainer.objective import (
    combine_rewards,
    future_returns,
    group_advantages,
    normalise,
    sparse_surrogate,
    token_costs,
)
from trainer.ops.dispatch import Backend
from trainer.ops.fused_lm_head import fused_lm_head_topk_kl
from trainer.student_head import ResponseHidden, lm_head
from trainer.teacher_source import open_teachers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HybridConfig:
    """What the hybrid objective adds to a GRPOConfig: teachers, Dense and Sparse terms.

    The dataclasses are the built-in loop's (trainer/config.py), so a YAML config of the
    loop's `teachers`, `dense` and `sparse` sections means the same here.
    client_id: the x-client-id template ("{host}", "{pid}", "{rank}" filled in; "" = one
    unique id per process and rank), the service's fairness key and metric label.
    metrics_port: Prometheus gauges on rank 0 (0 = off). backend: the fused op's
    implementation ("auto": Triton on CUDA, chunked torch on CPU).
    """

    teachers: tuple[TeacherSpec, ...]
    dense: DenseConfig = field(default_factory=DenseConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    client_id: str = ""
    metrics_port: int = 0
    backend: Backend = "auto"


class HybridGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is the hybrid Dense + Sparse estimator against teachers
    behind the teacher service (or in-process ones); see the module docstring."""

    def __init__(self, *args: Any, hybrid: HybridConfig, **kwargs: Any) -> None:
        if not hybrid.teachers:
            raise ValueError("hybrid.teachers: at least one teacher is needed")
        if hybrid.dense.support == "full":
            raise ValueError(
                "hybrid.dense.support 'full' needs full teacher logits; use 'student', "
                "'teacher' or 'union' with the teacher service"
            )
        super().__init__(*args, **kwargs)
        a = self.args
        if self.beta != 0.0:
            raise ValueError(f"args.beta must be 0 (the KL term is the teacher's), got {a.beta}")
        if self.num_iterations != 1:
            raise ValueError(
                f"args.num_iterations must be 1 (the estimator is on-policy), "
                f"got {a.num_iterations}"
            )
        if a.gradient_accumulation_steps % a.steps_per_generation:
            raise ValueError(
                f"args.gradient_accumulation_steps ({a.gradient_accumulation_steps}) must be a "
                f"multiple of args.steps_per_generation ({a.steps_per_generation}): rollouts "
                "reused after an optimizer step would be off-policy"
            )
        local = a.per_device_train_batch_size * a.steps_per_generation
        if local % self.num_generations:
            raise ValueError(
                f"per_device_train_batch_size × steps_per_generation ({local}) must be a "
                f"multiple of num_generations ({self.num_generations}): each rank needs whole "
                "groups for the baselines"
            )
        self.hybrid = hybrid
        lm = self.accelerator.unwrap_model(self.model)
        self._vocab = int(lm.config.vocab_size)
        lm_head(lm)  # raises for heads the fused op cannot reproduce (soft-capping, ...)
        rank = self.accelerator.process_index
        self.client_id = client_id_for(RunConfig(client_id=hybrid.client_id), rank)
        self._teachers = open_teachers(
            hybrid.teachers,
            self.accelerator.device,
            self._vocab,
            tokenizer_fingerprint(self._tokenizer),
            self.client_id,
        )
        self._t_weights = torch.tensor(
            [t.weight for t in hybrid.teachers], dtype=torch.float32, device=self.accelerator.device
        )
        self._redirect = _ForwardRedirection()
        self._pending: tuple | None = None
        self._rewards_global: torch.Tensor | None = None
        self._wait_s = 0.0  # teacher wait within the current optimizer step
        self._busy_s = 0.0  # time in training_step within the current optimizer step
        self.step_records: list[dict[str, float]] = []  # per optimizer step, this rank
        self._runlog = RunLog(
            a.output_dir,
            enabled=self.accelerator.is_main_process,
            total_steps=max(a.max_steps, 0),
            metrics_port=hybrid.metrics_port,
            progress=False,
        )

    # --- generation: teachers start scoring as soon as TRL has the completions ---------

    def _generate(self, prompts: list) -> tuple:
        result = super()._generate(prompts)
        prompt_ids, completion_ids, tool_mask = result[0], result[1], result[2]
        if tool_mask is not None:
            raise NotImplementedError("the hybrid loss does not support tool calls or env_mask")
        mode = "train" if self.model.training else "eval"
        G = self.num_generations if mode == "train" else self.num_generations_eval
        batch = rollout_batch(prompt_ids, completion_ids, G, self._tokenizer.pad_token_id or 0)
        dcfg = self.hybrid.dense
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as lm:
            topk, lp = student_topk_and_logprobs(lm, batch, min(dcfg.k, self._vocab))
        batch = dataclasses.replace(batch, student_topk=topk)
        query = topk if dcfg.query_student_ids else None
        pending = [t.submit(batch, dcfg.k, query, False) for t in self._teachers]
        self._pending = (batch, lp, pending, G)
        return result

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_global = rewards  # [B_global, J], gathered over ranks by TRL
        return rewards

    def _wait_for_teachers(self, pending: list) -> list:
        outputs = []
        for spec, p in zip(self.hybrid.teachers, pending, strict=True):
            try:
                outputs.append(p.result())
            except TeacherError as exc:  # say which teacher and step; keep the client's type
                raise type(exc)(
                    f"hybrid trainer, step {self.state.global_step}, rank "
                    f"{self.accelerator.process_index}: teacher {spec.name!r} at "
                    f"{list(spec.endpoints)} failed: {exc}",
                    exc.code,
                ) from exc
            finally:
                self._wait_s += p.waited_s
        return outputs

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        out = super()._generate_and_score_completions(inputs)
        assert self._pending is not None and self._rewards_global is not None
        batch, lp, pending, G = self._pending
        self._pending = None
        outputs = self._wait_for_teachers(pending)
        dev = self.accelerator.device
        B, T = batch.mask.shape
        if B % G or any(
            not torch.equal(batch.input_ids[g * G, : batch.starts[g * G]],
                            batch.input_ids[g * G + j, : batch.starts[g * G + j]])
            for g in range(B // G) for j in range(1, G)
        ):  # fmt: skip
            raise RuntimeError(f"this rank's rollouts are not whole groups of {G} completions")

        # Rewards of this rank's rows (TRL gathered them over ranks), r = Σ_j α_j r_j.
        lo = self.accelerator.process_index * B
        per_func = self._rewards_global[lo : lo + B].nan_to_num(0.0).T  # [J, B]
        r = combine_rewards(per_func.to(dev), self.reward_weights.to(dev))  # [B]

        # Sparse weights A = G_t^γ − b, per group (objective.py, as hybrid_loss does).
        dcfg, scfg = self.hybrid.dense, self.hybrid.sparse
        lam, gamma = scfg.lam(self.state.global_step), scfg.gamma(self.state.global_step)
        mask = batch.mask.to(dev)
        lq_tok = torch.stack([o.token_logprobs for o in outputs]).to(dev)  # [M, B, T]
        c0 = token_costs(lp.to(dev), lq_tok, self._t_weights, mask)  # [B, T]
        c = dcfg.kl_coef * c0
        kind = "none" if G < 2 else scfg.baseline
        c_ret = c if scfg.cost_clip is None else c.clamp(-scfg.cost_clip, scfg.cost_clip)
        adv = group_advantages(future_returns(c_ret, mask, gamma), r, mask, G, kind, lam=lam)

        # Dense support and the teachers' log-probs on it.
        N = B * T
        support, lq = dense_support(outputs, batch.student_topk.reshape(N, -1), self._vocab, dcfg)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["hybrid/lam"].append(lam)
        self._metrics[mode]["hybrid/gamma"].append(gamma)
        # The sampled KL estimate Σ_t c_t / tokens (c_t = Σ_m w_m (log π − log q_m)).
        self._metrics[mode]["hybrid/kl_sampled"].append(float(c0.sum() / mask.sum().clamp_min(1)))
        out.update(
            hd_input_ids=batch.input_ids.to(dev),  # [B, L]
            hd_positions=batch.positions.to(dev),  # [B, T]
            hd_targets=batch.targets.to(dev),  # [B, T]
            hd_mask=mask,  # [B, T]
            hd_support=support.reshape(B, T, -1).to(dev),  # [B, T, K']
            hd_lq=lq.reshape(lq.shape[0], B, T, -1).transpose(0, 1).to(dev),  # [B, M, T, K']
            hd_advantages=adv,  # [B, T]
        )
        return out

    # --- the loss ----------------------------------------------------------------------

    def _hybrid_loss(self, lm: torch.nn.Module, inputs: dict[str, Any]) -> tuple:
        """Runs inside the wrapper's forward. Returns (loss, stats [5] detached)."""
        mask = inputs["hd_mask"]  # [B, T]
        B, T = mask.shape
        N = B * T
        # The loop's own route (trainer/student_head.py): decoder once, response rows gathered.
        hidden = ResponseHidden(lm)(inputs["hd_input_ids"], inputs["hd_positions"])  # [B, T, H]
        weight, bias = lm_head(lm)
        h = hidden.reshape(N, -1)
        lq = inputs["hd_lq"].transpose(0, 1)  # [M, B, T, K']
        res = fused_lm_head_topk_kl(
            h,
            weight.to(h.dtype),  # as the loop: under bf16 autocast the op runs in bf16
            None if bias is None else bias.to(h.dtype),
            inputs["hd_targets"].reshape(N),
            inputs["hd_support"].reshape(N, -1),
            lq.reshape(lq.shape[0], N, -1),
            None,
            self._t_weights,
            mask.reshape(N),
            self.hybrid.dense.mode,
            backend=self.hybrid.backend,
        )
        norm = self.hybrid.sparse.normalisation
        kl, lp = res.kl.reshape(B, T), res.token_logprob.float().reshape(B, T)
        dense = normalise(kl, mask, norm)
        sparse = sparse_surrogate(lp, inputs["hd_advantages"], mask, norm)
        loss = self.hybrid.dense.kl_coef * dense + sparse
        m = mask.reshape(N)
        stats = torch.stack(
            [res.kl.sum(), (res.student_mass * m).sum(), (res.tail * m).sum(), m.sum(), dense]
        ).detach()
        return loss, stats

    def compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        if return_outputs:
            raise ValueError("HybridGRPOTrainer does not return outputs")
        unwrapped = self.accelerator.unwrap_model(model)
        # Through the DDP/FSDP/DeepSpeed wrapper's forward, so that DDP prepares its
        # gradient reduction and sharded parameters are gathered for the decoder and head.
        loss, stats = self._redirect(model, unwrapped, self._hybrid_loss, unwrapped, inputs)
        # Collectives outside the wrapped forward (inside it they could interleave badly).
        kl_sum, mass_sum, tail_sum, n_tok, _ = self.accelerator.reduce(stats, reduction="sum")
        n = n_tok.clamp_min(1.0)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["hybrid/kl"].append(float(kl_sum / n))
        self._metrics[mode]["hybrid/student_mass"].append(float(mass_sum / n))
        self._metrics[mode]["hybrid/tail"].append(float(tail_sum / n))
        self._metrics[mode]["hybrid/loss"].append(float(loss.detach()))
        if mode == "train":  # GRPO scales its own loss for accumulation (loss_is_scaled_for_ga)
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    # --- timing, logging, teardown --------------------------------------------------------

    def training_step(self, model: torch.nn.Module, inputs: Any, num_items_in_batch: Any = None):
        t0 = time.perf_counter()
        out = super().training_step(model, inputs, num_items_in_batch)  # GRPO counts _step
        self._busy_s += time.perf_counter() - t0
        if self._step % self.current_gradient_accumulation_steps == 0:
            frac = self._wait_s / max(self._busy_s, 1e-9)
            self._metrics["train"]["hybrid/teacher_wait_frac"].append(frac)
            self.step_records.append(
                {"teacher_wait_s": self._wait_s, "step_time_s": self._busy_s,
                 "teacher_wait_frac": frac}
            )  # fmt: skip
            self._wait_s = self._busy_s = 0.0
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        super().log(logs, start_time)  # merges self._metrics into logs (TRL's loggers)
        if "hybrid/kl" not in logs:
            return
        names = {"reward": "reward", "hybrid/kl": "kl", "hybrid/student_mass": "student_mass",
                 "hybrid/tail": "tail", "hybrid/teacher_wait_frac": "teacher_wait_frac",
                 "hybrid/lam": "lam", "hybrid/gamma": "gamma", "hybrid/loss": "loss",
                 "hybrid/kl_sampled": "kl_sampled", "step_time": "step_time_s"}  # fmt: skip
        row = {b: float(logs[a]) for a, b in names.items() if logs.get(a) is not None}
        self._runlog.log(self.state.global_step, row)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """TRL's train(); the teachers' connections are closed when it ends, however."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self.close()

    def close(self) -> None:
        """Closes the teacher connections and the metrics log (idempotent)."""
        for t in self._teachers:
            t.close()
        self._teachers = []
        self._runlog.close()


__all__ = ["HybridConfig", "HybridGRPOTrainer"]
