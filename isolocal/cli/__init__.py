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
every worker of rank 0's node as soon as one exits, they first wait (up to `FIRST_RANK_GRACE_S`) for
rank 0 to print, and print their own line only if it never does. Each other node's agent sees only its
own workers: there the first local rank prints the line at once, naming its node, so every node's log
says why it stopped.
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


def _report(line: str, agreed: bool = False) -> None:
    """Print a run-ending line from rank 0 (and from each other node's first local rank, naming its
    node). Another rank of rank 0's node under torchrun's agent waits for rank 0 to end the launch (the
    agent then ends this process) and prints only when that does not happen; not after an `agreed`
    stop (an interrupt: every rank stopped at the same step, so rank 0 says it)."""
    if os.environ.get("RANK", "0") != "0":
        if "TORCHELASTIC_RUN_ID" not in os.environ:
            return
        node = os.environ.get("GROUP_RANK", "0")
        if node != "0":
            if os.environ.get("LOCAL_RANK") == "0":
                print(f"{line} (node {node})", file=sys.stderr, flush=True)
            return
        if agreed:
            return
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the agent's SIGTERM ends the wait at once
        time.sleep(FIRST_RANK_GRACE_S)
        line = f"{line} (rank {os.environ['RANK']})"
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if not getattr(args, "passthrough", False):  # `isolocal torchrun` hands its arguments to torchrun's parser
        parser.parse_args(argv)  # the usual error for what it does not know
    args.rest = rest
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as err:  # every rank stops together: one line, from rank 0
        _report(f"isolocal {args.command}: {err}", agreed=True)
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
