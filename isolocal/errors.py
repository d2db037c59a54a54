"""Every error class of the package, in one module that imports nothing, so any layer can raise them.

These are the errors a run ends with on purpose; the CLI prints each as one line. Each is still importable
from the module that raises it (`isolocal.config.ConfigError`, `isolocal.data.DatasetError`,
`isolocal.train.pipeline.DeepSpeedVersionError`).
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what would be valid."""


class DatasetError(ValueError):
    """A dataset file or directory is missing, truncated or malformed; the message names it."""


class DeepSpeedVersionError(ImportError):
    """The installed DeepSpeed is missing or outside the range the pipeline engines are tested with."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written, or does not fit its model; the message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full): an OSError too, as the cause was one."""


class OutputError(ValueError):
    """An output directory or file cannot be created or written (read-only, a parent is a file, no
    permission); the message names the path. Raised before any work, so nothing is half-written."""


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss or gradient; the message names the step and the stage."""


class RunInterrupted(Exception):
    """SIGINT or SIGTERM ended a run after it saved its state; the message says how to resume."""

    exit_code = 130  # what shells report for a process ended by SIGINT
