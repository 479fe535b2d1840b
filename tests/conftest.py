"""Session-wide test setup that must happen before any project module is imported.

TRITON_INTERPRET decides, when a @triton.jit kernel is decorated, whether it runs
compiled or interpreted; any test package may import the trainer (and so its kernels)
first, so it is set here, at the root, for every test on a machine without CUDA.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
