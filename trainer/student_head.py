"""The student's forward for the fused top-K path: hidden states at the response rows and
the LM head's parameters, so that the [B·T, V] logits are never built.

Route (docs/trainer.md § Fused LM head): `ResponseHidden` runs the causal LM's decoder
(`lm.get_decoder()`, which ends with the final norm) once over [B, L] and gathers the
[B, T] response rows; `lm_head(lm)` returns the output projection's weight [V, d] and
bias [V] | None; trainer.ops.fused_lm_head_topk_kl does the head, the top-K KL and
log π(y_t) in chunks of V. With tied embeddings the head's weight *is* the input
embedding's Parameter, so its gradient from the fused op and from the embedding lookup
add up in that one Parameter, as in the unfused model.
"""

from __future__ import annotations

import torch
from torch import nn


class ResponseHidden(nn.Module):
    """Decoder once over prompt + response -> final hidden states at the response rows.

    A module (not a function) so that DistributedDataParallel can wrap it, like
    rollout.ResponseLogits; the head's parameters live in the same module, receive their
    gradient from the fused op's backward, and DDP's hooks reduce them like any other.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L], positions [B, T] -> hidden [B, T, d]."""
        hidden = self.lm.get_decoder()(input_ids=input_ids).last_hidden_state  # [B, L, d]
        idx = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, idx)


def lm_head(lm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, d], bias [V] | None) of the causal LM's output projection.

    Raises for heads the fused op cannot reproduce: anything but a plain nn.Linear, or a
    model whose forward post-processes the logits (soft-capping, a logit scale)."""
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"dense.fused needs an nn.Linear LM head, got {type(head).__name__}; "
            "set dense.fused: false"
        )
    cfg = lm.config
    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"dense.fused: the model's config sets {name} = {getattr(cfg, name)!r}, "
                "which the fused LM head does not apply; set dense.fused: false"
            )
    return head.weight, head.bias
