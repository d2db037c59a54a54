"""The `isolocal` command. Each subcommand module registers here.

A subcommand module provides `add_parser(subparsers)` (which sets `func` on its parser); the
function that runs parses, calls the library once and prints. What only some runs need (deepspeed
for a pipeline) is imported inside that function, so `isolocal --help` does not pay for it.
Expected errors (bad config, missing data, an unreadable checkpoint, a non-finite loss, a missing or
untested optional dependency) print one line and exit 2, without a traceback. An interrupted run
(SIGINT / SIGTERM after its state is saved, or Ctrl-C before training started) prints one line and
exits 130. Under a launcher (torchrun), run-wide stops are printed by rank 0 only.
"""
from __future__ import annotations

import argparse
import os
import sys

from isolocal.cli import analyze, eval, study, train
from isolocal.config import ConfigError
from isolocal.errors import NonFiniteError, RunInterrupted

SUBCOMMANDS = (train, eval, analyze, study)  # pretrain, export, info | eval | analyze | compare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="isolocal", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    first_rank = os.environ.get("RANK", "0") == "0"
    try:
        return int(args.func(args) or 0)
    except RunInterrupted as err:  # every rank stops together: one line, from rank 0
        if first_rank:
            print(f"isolocal {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"isolocal {args.command}: interrupted (Ctrl-C) before a checkpoint could be written; nothing "
              "new was saved", file=sys.stderr)
        return RunInterrupted.exit_code
    except NonFiniteError as err:
        if first_rank:
            print(f"isolocal {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"isolocal {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
