"""Real Slurm on this machine (the `local_slurm` fixture): a batch job runs to COMPLETED, and a running job
can be requeued (it runs again, with SLURM_RESTART_COUNT=1) and signalled (USR1 reaches the batch script's
trap), the two things a preemptible run relies on."""
from pathlib import Path

import pytest

from isolocal.testing.slurm import LocalSlurm


def batch_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    return path


@pytest.mark.slow
def test_a_batch_job_runs_to_completion(local_slurm: LocalSlurm, tmp_path: Path):
    marker = tmp_path / "ran"
    job = local_slurm.sbatch(batch_script(tmp_path / "job.sh", f'echo "$SLURM_JOB_ID" > {marker}\n'))
    assert local_slurm.wait(job, timeout=30) == "COMPLETED", local_slurm.describe(job)
    assert marker.read_text().split() == [job]


@pytest.mark.slow
def test_a_running_job_can_be_requeued_and_signalled(local_slurm: LocalSlurm, tmp_path: Path):
    runs, signals, stop = tmp_path / "runs", tmp_path / "signals", tmp_path / "stop"
    # `sleep & wait`: bash runs a trap only between commands, and `wait` returns as a signal arrives.
    script = batch_script(tmp_path / "job.sh", f"""\
trap 'echo usr1 >> {signals}' USR1
echo "${{SLURM_RESTART_COUNT:-0}}" >> {runs}
while [ ! -e {stop} ]; do sleep 0.2 & wait $!; done
""")
    job = local_slurm.sbatch(script, "--requeue")

    def lines(path: Path) -> list[str]:
        return path.read_text().split() if path.exists() else []

    local_slurm.until(lambda: lines(runs) == ["0"], 30, "the first run", job)
    local_slurm.run("scontrol", "requeue", job)
    local_slurm.until(lambda: lines(runs) == ["0", "1"], 40, "the requeued run", job)
    assert local_slurm.job(job)["Restarts"] == "1"

    local_slurm.run("scancel", "--batch", "--signal=USR1", job)
    local_slurm.until(lambda: lines(signals) == ["usr1"], 15, "USR1 in the batch script's trap", job)
    assert local_slurm.state(job) == "RUNNING", "USR1 is trapped, so the job goes on"

    stop.touch()
    assert local_slurm.wait(job, timeout=30) == "COMPLETED", local_slurm.describe(job)
    assert lines(runs) == ["0", "1"]
