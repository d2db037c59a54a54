"""Studies: paired variants x seeds, their runs, statistics over seeds, claims and one report.

Modules, each importing only those before it: `stats` (scipy.stats intervals, paired tests,
verdicts, Holm, power), `schema` (the study file), `job` (one run in its own process; the only
module that imports the evaluation code), `runner` (launch, resume, progress), `summary` (the runs'
numbers in long form, summary.csv), `claims` (claims judged: verdicts, floors, Holm, power),
`tables` (intervals, paired differences, claim verdicts, the `--plan` table), `plots` (the figures),
`report` (report.md). `isolocal compare` is `isolocal.cli.study`.
"""
from isolocal.study.schema import Claim, Run, Study, load_study, select_runs

__all__ = ["Claim", "Run", "Study", "load_study", "select_runs"]
