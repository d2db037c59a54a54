"""`isolocal compare -c study.toml [--only variant[:seed] ...] [--report-only] [--set key=value ...]`.

Runs every missing run of the study (see `isolocal.study.schema` for the file, `runner` for resume
and progress), then builds the report from the runs' saved files (`report`); `--report-only`
rebuilds the report without running anything, and refuses a directory that holds none of the
study's runs. Exits 1 when a run it ran failed (the report says why), 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

from isolocal.config import ConfigError
from isolocal.io.paths import check_writable_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="run a paired multi-seed study (global vs isolated vs controls) and report",
                              description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="study TOML (see experiments/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override study fields, e.g. base.train.epochs=3 or study.seeds=[0,1]")
    p.add_argument("--only", action="extend", nargs="+", default=[], metavar="VARIANT[:SEED]",
                   help="run only these variants (all their seeds) or variant:seed runs; the report covers the whole study")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from saved runs, no training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from isolocal.study.report import build_report  # deferred: --help runs without torch
    from isolocal.study.runner import StudyRunner  # deferred: --help runs without torch
    from isolocal.study.schema import load_study, select_runs  # deferred: --help runs without torch
    from isolocal.study.summary import run_status  # deferred: --help runs without torch

    study = load_study(args.config, args.overrides)
    runs = select_runs(study, args.only)
    if args.only and args.report_only:
        raise ValueError("--only selects runs to run; it has no effect with --report-only")
    check_writable_dir(study.root, "study.out_dir")  # the runs and the report are written there
    if args.report_only and not any(run.dir.is_dir() for run in runs):
        raise ConfigError(f"--report-only: {study.root} holds none of study {study.name!r}'s runs "
                          f"({study.root / 'runs'}/<variant>/...); check study.out_dir, or run the study first")
    launched = [] if args.report_only else StudyRunner(study, runs).run()
    print(f"report: {build_report(study)}")
    failed = [run.label for run in launched if run_status(run)["status"] != "ok"]
    if failed:
        print(f"isolocal compare: {len(failed)} of {len(launched)} runs failed ({', '.join(failed)}); "
              "see the report", file=sys.stderr)
        return 1
    return 0
