"""Trainer tests: run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before any module that defines a @triton.jit kernel is
imported (triton decides interpreted vs compiled when the kernel is decorated), so it is
set here, at conftest import time. On a machine with CUDA the compiled path is kept.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure through the test's locals)."""
    return random.randrange(2**31)


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
