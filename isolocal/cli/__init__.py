"""The `isolocal` command. Each subcommand module registers here.

A subcommand module provides `add_parser(subparsers)` (which sets `func` on its parser); the
function that runs parses, calls the library once and prints. What only some runs need (deepspeed
for a pipeline) is imported inside that function, so `isolocal --help` does not pay for it.
Expected errors (bad config, missing data, an unreadable checkpoint, a non-finite loss, a missing or
untested optional dependency) print one line and exit 2, without a traceback. An interrupted run
(SIGINT / SIGTERM after its state is saved, or Ctrl-C before training started) prints one line and
exits 130. Under a launcher (torchrun), these lines are printed by rank 0 only: every rank checks the
same config and files before the process group starts, and stops together inside it, so rank 0's line
speaks for all. The other ranks exit with the same code, silently; under torchrun's agent, which ends
every worker as soon as one exits, they first wait (up to `FIRST_RANK_GRACE_S`) for rank 0 to print,
and print their own line only if it never does.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from isolocal.cli import analyze, eval, study, submit, train
from isolocal.config import ConfigError
from isolocal.errors import NonFiniteError, RunInterrupted

SUBCOMMANDS = (train, eval, analyze, study, submit)  # pretrain, export, info | eval | analyze | compare | submit
FIRST_RANK_GRACE_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isolocal", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def _report(line: str) -> None:
    """Print a run-ending line from rank 0; another rank under torchrun's agent waits for rank 0 to
    end the launch (the agent then ends this process) and prints only when that does not happen."""
    if os.environ.get("RANK", "0") != "0":
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the agent's SIGTERM ends the wait at once
        time.sleep(FIRST_RANK_GRACE_S)
        line = f"{line} (rank {os.environ['RANK']})"
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as err:  # every rank stops together: one line, from rank 0
        _report(f"isolocal {args.command}: {err}")
        return err.exit_code
    except KeyboardInterrupt:
        _report(f"isolocal {args.command}: interrupted (Ctrl-C) before a checkpoint could be written; nothing "
                "new was saved")
        return RunInterrupted.exit_code
    except (NonFiniteError, ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        _report(f"isolocal {args.command}: error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
