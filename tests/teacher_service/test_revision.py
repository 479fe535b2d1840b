"""The model revision in Info tells checkpoints apart by content, not only by shape."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from teacher_service.backends.torch_backend import directory_revision
from teacher_service.random_model import save_random_model


def test_same_architecture_different_weights_get_different_revisions(tmp_path: Path) -> None:
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    a = save_random_model(tmp_path / "a", 300, hidden=16, layers=1, seed=seed)
    b = save_random_model(tmp_path / "b", 300, hidden=16, layers=1, seed=seed)
    assert directory_revision(a) == directory_revision(b)  # same content, same revision

    # Nudge one weight of b: same shapes, same header, different content.
    weights = load_file(b / "model.safetensors")
    name = sorted(weights)[len(weights) // 2]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[int(torch.randint(0, weights[name].numel(), ()))] += 1.0
    save_file(weights, b / "model.safetensors", metadata={"format": "pt"})
    assert directory_revision(a) != directory_revision(b)
