"""Shared test settings: deterministic, single-threaded math so tests are fast on 2 cores."""
import os

import pytest
import torch

from isolocal.config.head_options import OPTIONS
from isolocal.heads import HEADS

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield


@pytest.fixture
def own_head_registry():
    """Heads and head options a test registers are gone afterwards (the registries are process-wide)."""
    heads, options = dict(HEADS), dict(OPTIONS)
    yield
    HEADS.clear()
    HEADS.update(heads)
    OPTIONS.clear()
    OPTIONS.update(options)
