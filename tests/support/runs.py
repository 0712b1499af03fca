"""Running vis4mer in tests: the project's paths, the CLI as a subprocess, one tiny training run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.sockets import is_loopback, listening_sockets, socket_owner

ROOT = Path(__file__).resolve().parents[2]
VIS4MER = [sys.executable, "-m", "vis4mer.orchestrator.cli"]
SYNTHETIC_YAML = str(ROOT / "sweeps" / "train_synthetic.yaml")
RAY_SESSION: dict = {}  # the session's Ray: "dir", its session directory (worker logs under logs/)


def tiny_run(uri: str, tmp_path, *extra: str) -> list[str]:
    """Overrides that make any training config a run of a few seconds on the synthetic test dataset:
    a 2-stage d_model-16 model, one batch per epoch, 2 epochs, seeded, no MLflow (`extra` overrides
    any of it, e.g. tracking.enabled=true)."""
    return [f"data.uri={uri}", f"run.storage_path={tmp_path}/runs", "model.d_model=16", "model.n_layers=2",
            "model.d_state=8", "model.dropout=0.0", "data.batch_size=16", "data.eval_batch_size=16",
            "train.epochs=2", "train.seed=3", "schedule.kind=constant", "optim.lr=0.01", "tracking.enabled=false",
            "data.shuffle_files=false", *extra]


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    listened: dict  # (ip, port) -> owner, for every socket that started listening while it ran
    # (the owner's command line is looked up for sockets not on loopback only)


def run_cli_watching_sockets(args: list[str], cwd: Path, timeout_s: float = 400) -> CliRun:
    """`vis4mer ARGS` in its own process group; while it runs, the listening sockets of this network
    namespace are sampled every 0.25 s."""
    before = set(listening_sockets())
    proc = subprocess.Popen(VIS4MER + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            start_new_session=True)
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())), daemon=True)
    reader.start()
    listened: dict = {}
    deadline = time.monotonic() + timeout_s
    while reader.is_alive() and time.monotonic() < deadline:
        for sock, inode in listening_sockets().items():
            if sock not in before and sock not in listened:
                listened[sock] = "" if is_loopback(sock[0]) else socket_owner(inode)
        time.sleep(0.25)
    if reader.is_alive():
        os.killpg(proc.pid, signal.SIGKILL)
        reader.join(30)
        raise TimeoutError(f"vis4mer {' '.join(args[:1])} ran for more than {timeout_s} s")
    return CliRun(proc.returncode, out["stdout"], out["stderr"], cwd, listened)
