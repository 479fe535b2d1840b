"""Trainer test fixtures. The Triton interpreter is switched on in tests/conftest.py."""

from __future__ import annotations

import random

import pytest
import torch


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed on failure through the test's locals)."""
    return random.randrange(2**31)


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
