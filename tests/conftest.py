"""Shared test settings: deterministic, single-threaded math so tests are fast on 2 cores; shared fixtures."""
import os
from collections.abc import Iterator

import pytest
import torch

from isolocal.config.head_options import OPTIONS
from isolocal.heads import HEADS
from isolocal.testing.slurm import LocalSlurm, SlurmError

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


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSlurm]:
    """A real one-node Slurm cluster for the session. Where it cannot start, the tests that use it fail
    with the reason (Slurm is part of the test setup, `.ci/install`), never skip."""
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
    except SlurmError as error:
        reason = str(error)
    else:
        reason = ""
    if reason:  # failed outside the except block, so the reason is printed once
        pytest.fail(f"local Slurm did not start: {reason}", pytrace=False)
    yield slurm
    slurm.stop()
