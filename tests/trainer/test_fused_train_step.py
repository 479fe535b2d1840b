"""The trainer's fused top-K path (dense.fused, the default) against the unfused one.

On one batch of real rollouts from a tiny random student scored by an in-process teacher,
the hybrid loss built from hidden states by the fused LM-head op must give the same loss
and the same gradient on every student parameter as the loss built from materialised
logits (fp32, tight tolerance), and no tensor of the fused step may hold [N, V] values.
"""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from tests.trainer.test_train_fixtures import VOCAB, tiny_models
from trainer import student_head
from trainer.config import DenseConfig, TeacherSpec
from trainer.objective import hybrid_loss
from trainer.ops import fused_lm_head_kernel, fused_lm_head_reference
from trainer.rollout import ResponseLogits, sample
from trainer.teacher_source import LocalTeacher
from trainer.train import student_terms


class _VocabRows(TorchDispatchMode):
    """Largest number of rows of V values (numel / V over tensors with a V-sized dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and VOCAB in t.shape:
                self.rows = max(self.rows, t.numel() // VOCAB)
        return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fused")
    teacher_dir, student_dir = tiny_models(root)
    teacher = LocalTeacher(TeacherSpec(name="t", model_dir=str(teacher_dir)), torch.device("cpu"))
    yield student_dir, teacher
    teacher.close()


def _step(lm, batch, outputs, rewards, cfg, fused):
    """One micro-batch's loss and backward as train.py runs it; returns (loss, grads, lp)."""
    lm.zero_grad(set_to_none=True)
    model = student_head.ResponseHidden(lm) if fused else ResponseLogits(lm)
    out = model(batch.input_ids, batch.positions)
    w = torch.tensor([0.7])
    lp, kl, _, _ = student_terms(out, lm, batch, outputs, w, cfg, fused)
    lq_tok = torch.stack([o.token_logprobs for o in outputs])
    loss, _ = hybrid_loss(lp, kl, lq_tok, batch.mask, rewards, teacher_weights=w, gamma=0.8,
                          lam=0.5, group_size=2)  # fmt: skip
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}, lp.detach()


@pytest.mark.parametrize(
    "support,mode,tied",
    [("student", "sparse", False), ("union", "exact", True), ("teacher", "renorm", False)],
)
def test_fused_step_gives_the_unfused_gradient(setup, seed, monkeypatch, support, mode, tied):
    """tied: the head's weight is the input embedding's Parameter; it must collect both
    gradients (the embedding lookup's and the fused head's), as in the unfused model."""
    student_dir, teacher = setup
    # Chunks of 64 columns, so that a whole-vocabulary tensor would be visible at V = 256.
    monkeypatch.setattr(fused_lm_head_reference, "DEFAULT_CHUNK", 64)
    monkeypatch.setattr(fused_lm_head_kernel, "DEFAULT_CHUNK", 64)
    lm = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).train()
    if tied:
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
        assert student_head.lm_head(lm)[0] is lm.get_input_embeddings().weight
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(5, 40) for _ in range(rng.randrange(2, 6))] for _ in range(4)]
    k = rng.randrange(3, 9)
    with torch.no_grad():
        ro = sample(lm, prompts, [{}] * 4, group_size=2, temperature=1.0, max_new_tokens=6,
                    stop_ids=(2,), keep_topk=k, pad_id=0,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip
    batch = ro.layout(pad_id=0)
    B, T = batch.mask.shape
    outputs = [teacher.submit(batch, k, batch.student_topk, full=False).result()]
    rewards = torch.rand(B, generator=torch.Generator().manual_seed(seed))
    cfg = DenseConfig(support=support, k=k, mode=mode)

    with _VocabRows() as seen_unfused:
        loss_u, grads_u, lp_u = _step(lm, batch, outputs, rewards, cfg, fused=False)
    assert seen_unfused.rows >= B * T  # the detector does see the unfused logits
    with _VocabRows() as seen:
        loss_f, grads_f, lp_f = _step(lm, batch, outputs, rewards, cfg, fused=True)

    assert B * T > 16  # more rows than the hidden size, so [V, d] cannot pass for [N, V]
    assert seen.rows <= 16, f"a tensor held {seen.rows} rows of V values (N = {B * T})"
    torch.testing.assert_close(loss_f, loss_u, atol=1e-6, rtol=1e-5)
    live = batch.mask.bool()  # padding rows: the fused op returns 0, the unfused garbage
    torch.testing.assert_close(lp_f[live], lp_u[live], atol=1e-5, rtol=1e-5)
    assert (lp_f[~live] == 0).all()
    assert grads_f.keys() == grads_u.keys()
    for name, g in grads_u.items():
        scale = g.abs().max().clamp_min(1e-8)
        err = (grads_f[name] - g).abs().max()
        assert err <= 1e-4 * scale, f"{name}: max err {err:.3g} at scale {scale:.3g}"
