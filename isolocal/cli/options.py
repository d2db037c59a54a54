"""Options several commands share."""
from __future__ import annotations

import argparse


def add_import_option(parser: argparse.ArgumentParser) -> None:
    """`--import MODULE_OR_PATH`, repeatable: user code (a head of one's own) imported before the config is read."""
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_PATH",
                        help="import a module or .py file first (repeatable), e.g. one that registers a head with "
                             "isolocal.heads.register_head; a run records it in its config for its other processes")
