"""Launching recipes as a cluster would, on this machine: `accelerate launch` (torchrun behind it) with
CPU processes over gloo, on one machine or as two "machines" (two launchers on 127.0.0.1)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.processes import end_tree, popen

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(script: Path, arguments: Sequence[str], *, processes: int, machines: int = 1, rank: int = 0,
                   port: int, extra: Sequence[str] = ()) -> list[str]:
    # `--multi_gpu` with ACCELERATE_USE_CPU starts torchrun's CPU processes (plain `--cpu` starts one)
    machine = ["--num_machines", str(machines)]
    if machines > 1:
        machine += ["--machine_rank", str(rank), "--main_process_ip", "127.0.0.1"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            *machine, "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), *extra,
            str(script), *arguments]


def launch(script: str | Path, arguments: Sequence[str], *, processes: int = 2, machines: int = 1,
           extra: Sequence[str] = (), env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `script` as `processes` CPU processes in all, over `machines` launchers (one per machine, the
    processes split evenly); returns the main machine's result, with every launcher's stderr joined."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    port = free_port()
    script = REPO / script
    runs = [popen(launch_command(script, arguments, processes=processes, machines=machines, rank=rank, port=port,
                                 extra=extra), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for rank in range(machines)]
    outputs = []
    try:
        for run in runs:
            outputs.append(run.communicate(timeout=timeout))
    finally:  # on a timeout or a failure too: no launcher, worker or DataLoader worker outlives the call
        for run in runs:
            end_tree(run)
    codes = [run.returncode for run in runs]
    return subprocess.CompletedProcess(runs[0].args, max(codes, key=abs), outputs[0][0],
                                       "\n".join(err for _, err in outputs))
