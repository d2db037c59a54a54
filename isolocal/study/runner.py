"""Running a study: every missing run in its own process, live progress on the console, resume.

A run is finished when its `result.json` says "ok" and its phase files are all there; finished runs
are never redone. Any other run (never started, failed, killed mid-way, or with a phase file deleted)
is launched again and its job resumes from what it left (`isolocal.study.job`). Before anything
runs, every run directory that already holds a `run.json` must match the study's current config for
it, so a changed study file cannot silently mix old and new runs in one report, and every run to do
passes `job.check_run`, so a bad evaluation or analysis setting fails the study before the first
pre-training rather than after each.

Progress comes from the runs' own files, without touching the trainer: the parent follows each
child's `metrics.jsonl` step records against the step count of its config (a tqdm bar with ETA on
a terminal, a plain line every 10 % or minute elsewhere: `isolocal.core.progress`) and prints one line when a run starts and one with its headline numbers when it ends.
Each child's full output goes to its `run.log`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from isolocal.core.progress import progress_bar
from isolocal.config import ConfigError
from isolocal.study.job import (FINETUNE, LOG, PRETRAIN, PROBES, RESULT, RUN_SPEC, check_run, read_json, run_evals,
                                step_plan, write_json)
from isolocal.study.schema import Run, Study, run_spec
from isolocal.study.summary import run_status

POLL_S = 1.0


def is_finished(run: Run) -> bool:
    """result.json says "ok" and every phase file of the run is there."""
    return run_status(run)["status"] == "ok"


# Settings that change how fast a run goes, never its numbers: a run made with either value is current.
SPEED_ONLY = frozenset({"config.data.prefetch"})


def _first_difference(old: object, new: object, key: str = "") -> str | None:
    """The first key whose value differs; keys only one side has (a config field added to or
    removed from isolocal since the run was made) and `SPEED_ONLY` settings are not differences."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) & set(new)):
            path = f"{key}.{k}" if key else k
            found = None if path in SPEED_ONLY else _first_difference(old[k], new[k], path)
            if found:
                return found
        return None
    return None if old == new else f"{key} ({old!r} -> {new!r})"


def check_stale(study: Study, runs: list[Run]) -> None:
    """Raise before any work when a run directory was made by a different config."""
    for run in runs:
        path = run.dir / RUN_SPEC
        if path.exists():
            diff = _first_difference(read_json(path), run_spec(study, run))
            if diff:
                raise ConfigError(f"{run.dir} was run with a different config: {diff}; restore the study "
                                  f"file or delete that directory to run it again")


class Progress:
    """Follows one child: its last logged step (bar with ETA) and which phase it is in."""

    def __init__(self, run: Run, spec: dict, position: int):
        self.run, self.spec = run, spec
        self.metrics = run.dir / "metrics.jsonl"
        self.total = step_plan(spec)[1] if spec["pretrain"] else 0
        self.bar = progress_bar(total=self.total or None, initial=self._last_step(), desc=self._desc(), unit="step",
                                position=position, leave=False, dynamic_ncols=True)

    def _last_step(self) -> int:
        """Steps done according to the metrics log (step records hold the 0-based last step)."""
        if not self.metrics.exists():
            return 0
        steps = [json.loads(line)["step"] for line in self.metrics.read_text().splitlines()
                 if '"kind": "step"' in line]
        return steps[-1] + 1 if steps else 0

    def phase(self) -> str:
        d, evals = self.run.dir, run_evals(self.spec)
        if self.spec["pretrain"] and not (d / PRETRAIN).exists():
            return "pretrain"
        probes = [m for m in evals if m != "finetune"]
        if probes and not (d / PROBES).exists():
            return " ".join(probes)
        if "finetune" in evals and not (d / FINETUNE).exists():
            return "finetune"
        return "analysis"

    def _desc(self) -> str:
        return f"{self.run.label}: {self.phase()}"

    def poll(self) -> None:
        done = min(self._last_step(), self.total) if self.total else 0
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        self.bar.set_description(self._desc(), refresh=True)

    def close(self) -> None:
        self.bar.close()


def _fmt_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def finish_line(run: Run, seconds: float) -> str:
    """One console line per finished run: status and headline numbers."""
    result = read_json(run.dir / RESULT)
    if result["status"] != "ok":
        return f"{run.label} FAILED after {_fmt_duration(seconds)}: {result['error']} (see {run.dir / LOG})"
    names = {"loss": "loss", "knn_sel": "k-NN", "linear_sel": "linear", "head_top": "top head",
             "finetune": "fine-tune"}
    numbers = ", ".join(f"{names[k]} {v:.4g}" for k, v in result["headline"].items())
    return f"{run.label} done in {_fmt_duration(seconds)}: {numbers} (test %; k-NN / linear: stage chosen on validation)"


def runs_to_do(study: Study, runs: list[Run]) -> list[Run]:
    """The runs not finished yet, after every check that needs no training (stale run directories,
    `job.check_run`): a bad setting fails the study before its first run starts."""
    check_stale(study, runs)
    todo = [r for r in runs if not is_finished(r)]
    for run in todo:
        check_run(run_spec(study, run))
    return todo


def open_run(study: Study, run: Run) -> dict:
    """Write the run's `run.json` (what its job process reads) and drop an old result; returns the spec."""
    spec = run_spec(study, run)
    run.dir.mkdir(parents=True, exist_ok=True)
    write_json(run.dir / RUN_SPEC, spec)
    (run.dir / RESULT).unlink(missing_ok=True)
    return spec


def runs_at_a_time(parallel: int) -> int:
    """`study.parallel`, or for 0 one run per core this process may use."""
    return parallel or len(os.sched_getaffinity(0))


def run_threads(parallel: int) -> int | None:
    """Threads per run when `parallel` runs share this machine's cores and OMP_NUM_THREADS does not say:
    the cores split evenly (two runs of two threads each on two cores fight over them); None for one run
    at a time or a set OMP_NUM_THREADS (torch's own default, or the user's choice, stands)."""
    if parallel == 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, len(os.sched_getaffinity(0)) // parallel)


def run_env(parallel: int) -> dict[str, str]:
    threads = run_threads(parallel)
    return {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}


def speed_line(study: Study) -> str:
    """How many runs go at once and with how many threads, and how to change it (a run's numbers depend
    on its thread count in their last bits, never on the other runs)."""
    parallel = runs_at_a_time(study.parallel)
    threads = run_threads(parallel)
    each = f", {threads} thread(s) each" if threads else ""
    why = " (study.parallel = 0: one per core; set it to 1 for one run at a time with every core)" \
        if not study.parallel else ""
    return f"{parallel} run(s) at a time{each}{why}; evaluation images transformed a batch at a time"


class StudyRunner:
    """Launches the missing runs of a study, `parallel` at a time, and reports progress."""

    def __init__(self, study: Study, runs: list[Run]):
        self.study, self.runs = study, runs
        self.parallel = runs_at_a_time(study.parallel)
        self.slots = list(range(self.parallel))
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self) -> list[Run]:
        """Run what is missing; returns the runs that were launched."""
        todo = runs_to_do(self.study, self.runs)
        done = len(self.runs) - len(todo)
        tqdm.write(f"[compare] {self.study.name}: {len(self.runs)} runs selected, {done} already finished, "
                   f"{len(todo)} to run; logs in {self.study.root / 'runs'}/<variant>/.../{LOG}")
        tqdm.write(f"[compare] {speed_line(self.study)}")
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = [pool.submit(self._launch, run, i + 1, len(todo)) for i, run in enumerate(todo)]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                self.stopping.set()  # queued runs do not start; running children got the signal too
                raise
        return todo

    def _launch(self, run: Run, index: int, count: int) -> None:
        if self.stopping.is_set():
            return
        spec = open_run(self.study, run)
        with self.lock:
            slot = self.slots.pop(0)
        tqdm.write(f"[compare] run {index}/{count}: {run.label} -> {run.dir}")
        start = time.perf_counter()
        progress = Progress(run, spec, slot)
        try:
            with open(run.dir / LOG, "a") as log:
                log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} isolocal.study.job {run.dir}\n")
                log.flush()
                proc = subprocess.Popen([sys.executable, "-m", "isolocal.study.job", str(run.dir)],
                                        stdout=log, stderr=subprocess.STDOUT, env=run_env(self.parallel))
                while proc.poll() is None:
                    progress.poll()
                    time.sleep(POLL_S)
        finally:
            progress.close()
            with self.lock:
                self.slots.append(slot)
        if not (run.dir / RESULT).exists():  # the process died without writing its result
            write_json(run.dir / RESULT, {"variant": run.variant, "seed": run.seed, "status": "failed",
                                          "error": f"process exited with code {proc.returncode}",
                                          "traceback": (run.dir / LOG).read_text()[-2000:]})
        tqdm.write(f"[compare] {finish_line(run, time.perf_counter() - start)}")
