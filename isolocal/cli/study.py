"""`isolocal compare -c study.toml [--only variant[:seed] ... | --report-only | --plan] [--set key=value ...]`.

Runs every missing run of the study (see `isolocal.study.schema` for the file, `runner` for resume
and progress), then builds the report from the runs' saved files (`report`); `--report-only`
rebuilds the report without running anything, and `--plan` prints, from the saved runs, how many
seeds would decide each claim with 80% power (writing nothing); both refuse a directory that holds
none of the study's runs. Exits 1 when a run it ran failed (the report says why), 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from isolocal.cli.options import add_import_option
from isolocal.config import ConfigError
from isolocal.io.paths import check_writable_dir

if TYPE_CHECKING:
    from isolocal.study.schema import Run, Study


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("compare", help="run a paired multi-seed study (global vs isolated vs controls) and report",
                              description=__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True, help="study TOML (see experiments/quickstart.toml)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override study fields, e.g. base.train.epochs=3 or study.seeds=[0,1]")
    p.add_argument("--only", action="extend", nargs="+", default=[], metavar="VARIANT[:SEED]",
                   help="run only these variants (all their seeds) or variant:seed runs; the report covers the whole study")
    add_import_option(p)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from saved runs, no training")
    p.add_argument("--plan", action="store_true",
                   help="print, from saved runs, each claim's paired differences and the seeds that would decide it "
                        "with 80%% power; no training, nothing written")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from isolocal.study.report import build_report  # deferred: --help runs without torch
    from isolocal.study.runner import StudyRunner  # deferred: --help runs without torch
    from isolocal.study.schema import load_study, select_runs  # deferred: --help runs without torch
    from isolocal.study.summary import run_status, summary_frame  # deferred: --help runs without torch
    from isolocal.study.tables import plan_table  # deferred: --help runs without torch

    if args.plan and (args.only or args.report_only):
        raise ValueError(f"--plan reads the saved runs and runs nothing; it does not go with "
                         f"{'--only' if args.only else '--report-only'}")
    study = load_study(args.config, args.overrides, args.imports)
    runs = select_runs(study, args.only)
    if args.only and args.report_only:
        raise ValueError("--only selects runs to run; it has no effect with --report-only")
    if args.plan:
        _require_runs(study, runs, "--plan")
        finished = [run for run in runs if run_status(run)["status"] == "ok"]
        print(plan_table(study, summary_frame(finished)).to_string(index=False))
        return 0
    check_writable_dir(study.root, "study.out_dir")  # the runs and the report are written there
    if args.report_only:
        _require_runs(study, runs, "--report-only")
    launched = [] if args.report_only else StudyRunner(study, runs).run()
    print(f"report: {build_report(study)}")
    failed = [run.label for run in launched if run_status(run)["status"] != "ok"]
    if failed:
        print(f"isolocal compare: {len(failed)} of {len(launched)} runs failed ({', '.join(failed)}); "
              "see the report", file=sys.stderr)
        return 1
    return 0


def _require_runs(study: Study, runs: list[Run], option: str) -> None:
    """Refuse a study directory without any of the study's runs (a wrong out_dir, or not run yet)."""
    if not any(run.dir.is_dir() for run in runs):
        raise ConfigError(f"{option}: {study.root} holds none of study {study.name!r}'s runs "
                          f"({study.root / 'runs'}/<variant>/...); check study.out_dir, or run the study first")
