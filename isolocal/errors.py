"""Errors a run ends with on purpose; the CLI prints each as one line (no torch import, so `--help` stays fast)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be read or written, or does not fit its model; the message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (disk full): an OSError too, as the cause was one."""


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss or gradient; the message names the step and the stage."""


class RunInterrupted(Exception):
    """SIGINT or SIGTERM ended a run after it saved its state; the message says how to resume."""

    exit_code = 130  # what shells report for a process ended by SIGINT
