"""`isolocal compare -c study.toml [--only variant[:seed] ...] [--report-only] [--set key=value ...]`.

Runs every missing run of the study (see `isolocal.study.schema` for the file, `runner` for resume
and progress), then builds the report from the runs' saved files (`report`); `--report-only`
rebuilds the report without running anything.
"""
from __future__ import annotations

import argparse



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

    study = load_study(args.config, args.overrides)
    runs = select_runs(study, args.only)
    if args.only and args.report_only:
        raise ValueError("--only selects runs to run; it has no effect with --report-only")
    if not args.report_only:
        StudyRunner(study, runs).run()
    print(f"report: {build_report(study)}")
    return 0
