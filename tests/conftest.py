"""Shared test fixtures."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch


@pytest.fixture
def seeded():
    """Seed Python, NumPy and torch for one test, then restore their previous RNG states."""
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
