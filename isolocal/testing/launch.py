"""Launch a script under torchrun with 2 gloo processes, as the data-parallel tests do."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two(script_text: str, tmp_path: Path, overrides: list[str], timeout: float = 240) -> str:
    """Write `script_text` to tmp_path, run it on 2 processes with (tmp_path, *overrides) as arguments;
    fail the test on a timeout or a non-zero exit, with the output's tail. Returns the output."""
    script = tmp_path / "ddp.py"
    script.write_text(script_text)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), str(tmp_path), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{output.decode()[-3000:]}")
    assert proc.returncode == 0, output.decode()[-3000:]
    return output.decode()
