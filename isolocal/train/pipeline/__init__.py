"""DeepSpeed pipeline parallelism over a stage-wise encoder's stages, global or gradient-isolated.

- `module`: `StagePipe`, the `PipelineModule` whose layers are the model's stages;
- `engine`: DeepSpeed's default schedule with one fused backward, and the isolated schedule;
- `runner`: `pretrain_pipeline(cfg)`, run in every process of a torchrun/deepspeed launch;
- `costmodel`, `partition`, `profile`, `plan`: predicted step time and bubble, the "count" / "cost"
  partitions, stage timing and the per-rank breakdown, `isolocal info --pipeline-stages` (pure
  Python or torch: they import no DeepSpeed, except `plan` for the "count" partition).
Pipeline checkpoints are read by `isolocal.io.checkpoint`. Modules are imported explicitly (deepspeed is
heavy to import). The engines subclass DeepSpeed's private names, so importing this package checks
that the installed DeepSpeed is in the tested range (`DEEPSPEED_RANGE`, as pinned in
pyproject.toml), without importing it.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from isolocal.errors import DeepSpeedVersionError

DEEPSPEED_RANGE = ">=0.19,<0.20"  # as pinned in pyproject.toml


def check_deepspeed(installed: str | None) -> None:
    """One line naming the tested range when `installed` (a version, None: not installed) is outside it."""
    if installed is None:
        raise DeepSpeedVersionError(f"isolocal.train.pipeline needs deepspeed {DEEPSPEED_RANGE} (the tested range); "
                                    "it is not installed")
    if Version(installed) not in SpecifierSet(DEEPSPEED_RANGE):
        raise DeepSpeedVersionError(f"isolocal.train.pipeline needs deepspeed {DEEPSPEED_RANGE} (the tested range), "
                                    f"found {installed}; install a version in that range")


def _installed() -> str | None:
    try:
        return version("deepspeed")
    except PackageNotFoundError:
        return None


check_deepspeed(_installed())
