"""Ray job submission on a real two-node cluster: `ray start --head` and `ray start --address` (own
processes, own temp dirs, loopback), `vis4mer submit` of a demo-style sweep whose trials train with
one DDP worker on each node, polled until SUCCEEDED, results in MLflow, credentials passed by name
and never printed; `vis4mer jobs list|status|logs|stop`. Everything started is stopped by PID."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_http

ROOT = Path(__file__).resolve().parents[1]
VIS4MER = [sys.executable, "-m", "orchestrator.cli"]
SECRET = "s3cr3t-value-that-must-not-leak"


def _ray_env() -> dict:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the job's `python` is this one
    return env


def _stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """Head (3 CPUs, runs the job drivers) + worker node (3 CPUs), each `ray start --block` in its own
    process group and temp dir; yields the dashboard URL. Six CPUs hold two two-worker trials at once
    (each also keeps one CPU for Ray Data)."""
    # short: Ray's unix sockets live under the temp dir, and socket paths are limited to 107 bytes
    root = Path(tempfile.mkdtemp(prefix="v4r-", dir="/tmp"))
    port, dash = free_port(), free_port()
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus", "3", "--object-store-memory", str(256 * 2**20), "--disable-usage-stats", "--block"]

    def own_ports() -> list[str]:
        # every port a node opens at a fixed default (the dashboard agent's 52365, the metrics and
        # runtime-env agents) gets a free one: the session's own local Ray may already hold the defaults
        return [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                 "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
                for arg in (flag, str(free_port()))]

    # The nodes' processes name their cluster in RAY_ADDRESS: Ray's State API (which Train's
    # placement-group cleaner calls without an address) otherwise finds two Ray instances on this
    # machine (the session's local one too), refuses to choose, and a finished trial's workers are
    # never freed: the next trial waited for them forever.
    node_env = dict(_ray_env(), RAY_ADDRESS=f"127.0.0.1:{port}")
    procs = []
    try:
        head = subprocess.Popen([ray, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                                 "--dashboard-port", str(dash), "--temp-dir", str(root / "head"), *common,
                                 *own_ports()],
                                env=node_env, stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(head)
        wait_http(f"http://127.0.0.1:{dash}/api/version", 90, head)
        worker = subprocess.Popen([ray, "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(root / "worker"),
                                   *common, *own_ports()], env=node_env, stdout=open(root / "worker.log", "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(worker)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            out = subprocess.run([ray, "status", "--address", f"127.0.0.1:{port}"], env=_ray_env(),
                                 capture_output=True, text=True, timeout=60)
            if out.stdout.count("node_") >= 2 or "6.0 CPU" in out.stdout:
                break
            assert worker.poll() is None, (root / "worker.log").read_text()[-2000:]
            time.sleep(1)
        else:
            raise TimeoutError("the worker node did not join: " + out.stdout[-1000:])
        yield f"http://127.0.0.1:{dash}"
    finally:
        for p in reversed(procs):
            _stop_group(p, grace_s=1)  # a throwaway cluster: `ray start --block` took 20 s to exit on SIGTERM,
            # and _kill_leftovers below SIGKILLs whatever of it is still there
        _kill_leftovers(str(root))
        shutil.rmtree(root, ignore_errors=True)


def _kill_leftovers(root: str, deadline_s: float = 30) -> None:
    """Every process of the cluster (its GCS, raylets, agents and workers name its temp dir on their
    command lines), not only the `ray start` groups: a Ray instance left behind makes Ray's State
    API refuse to choose between it and the session's, and the later sweeps' stopped trials would
    never be torn down."""
    def pids() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if root.encode() in (d / "cmdline").read_bytes():
                        found.append(int(d.name))
                except OSError:
                    pass
        return found

    end = time.monotonic() + deadline_s
    while (left := pids()) and time.monotonic() < end:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _vis4mer(*args, timeout=120, env=None):
    return subprocess.run(VIS4MER + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or _ray_env())


def _wait_status(address: str, job_id: str, want: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        out = _vis4mer("jobs", "status", job_id, "--address", address)
        assert out.returncode == 0, out.stderr
        status = out.stdout.split(":", 1)[1].split()[0]
        if status in want:
            return status
        time.sleep(2)
    logs = _vis4mer("jobs", "logs", job_id, "--address", address).stdout
    raise TimeoutError(f"job {job_id} still {status} after {timeout} s; its log ends:\n{logs[-3000:]}")


@pytest.mark.timeout(600)  # 2 trials at once, each on both nodes: ~70 s here
def test_submit_the_demo_sweep_to_a_two_node_cluster(ray_cluster, synthetic_dataset, tmp_path):
    """`vis4mer submit sweeps/demo.yaml` with the project as working_dir, scaled down on the command
    line: its depth/pooling schedule and lr fixed (its two state sizes remain: two trials, run at
    once), tiny widths, 2 epochs, and one DDP worker on each node (STRICT_SPREAD), so every trial
    spans the cluster."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"data.uri={synthetic_dataset}", f"run.storage_path={tmp_path}/runs", f"tracking.tracking_uri={uri}",
                 "tracking.experiment=jobs", "model={n_layers: 2, pool: [2, 2]}", "optim.lr=3e-3", "model.d_model=16",
                 "data.batch_size=4", "train.epochs=2", "schedule.kind=constant", "scaling.num_workers=2",
                 "scaling.placement_strategy=STRICT_SPREAD"]
    env = dict(_ray_env(), VIS4MER_TEST_TOKEN=SECRET)
    out = _vis4mer("submit", "sweeps/demo.yaml", *overrides, "--address", ray_cluster,
                   "--env", "VIS4MER_TEST_TOKEN", env=env)
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted job (\S+):", out.stdout).group(1)
    assert SECRET not in out.stdout + out.stderr and '"VIS4MER_TEST_TOKEN": "***"' in out.stdout

    status = _wait_status(ray_cluster, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, timeout=450)
    logs = _vis4mer("jobs", "logs", job_id, "--address", ray_cluster)
    assert status == "SUCCEEDED", logs.stdout[-4000:]
    assert "sweep demo: 2 trials, 2 reported, 0 errored" in logs.stdout
    listing = _vis4mer("jobs", "list", "--address", ray_cluster)
    assert listing.returncode == 0 and job_id in listing.stdout
    assert "python -m orchestrator.cli sweep sweeps/demo.yaml data.uri=" in listing.stdout
    assert SECRET not in logs.stdout + listing.stdout  # by name only: never in the entrypoint or the logs

    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert all(r.data.params["optim.lr"] == "0.003" and r.data.params["model.n_layers"] == "2"
               and r.data.params["model.pool"] == "[2, 2]" and r.data.params["scaling.num_workers"] == "2"
               for r in children)
    assert sorted(r.data.params["model.d_state"] for r in children) == ["16", "32"]  # the demo's state sizes
    assert all("val_top1" in r.data.metrics for r in children)
    everything = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert SECRET not in everything


def test_jobs_stop_stops_a_running_job(ray_cluster, synthetic_dataset, tmp_path):
    cfg = {"data": {"uri": synthetic_dataset}, "model": {"d_model": 16, "d_state": 8, "n_layers": 1},
           "train": {"epochs": 500}, "run": {"storage_path": str(tmp_path / "runs")},
           "tracking": {"enabled": False}}
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(cfg))
    out = _vis4mer("submit", str(tmp_path / "long.yaml"), "data.batch_size=4", "--address", ray_cluster,
                   "--working-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    job_id = re.search(r"submitted job (\S+):", out.stdout).group(1)
    assert _wait_status(ray_cluster, job_id, {"RUNNING", "FAILED", "SUCCEEDED"}, timeout=120) == "RUNNING"
    out = _vis4mer("jobs", "stop", job_id, "--wait", "--address", ray_cluster, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"job {job_id}: STOPPED" in out.stdout


def test_job_commands_refuse_bad_input_in_one_line(ray_cluster, tmp_path):
    (tmp_path / "t.yaml").write_text("data: {uri: x}\n")
    cases = [
        (["jobs", "status", "raysubmit_nosuchjob", "--address", ray_cluster], "raysubmit_nosuchjob"),
        (["submit", str(tmp_path / "t.yaml"), "--env", "NOT_SET_ANYWHERE_42", "--working-dir", str(tmp_path),
          "--address", ray_cluster], "--env NOT_SET_ANYWHERE_42: not set"),
        (["submit", str(tmp_path / "t.yaml"), "storage.secret_key=abc", "--working-dir", str(tmp_path),
          "--address", ray_cluster], "credentials never go on the command line"),
        (["submit", str(tmp_path / "t.yaml"), "--address", ray_cluster], "outside the working dir"),
        (["submit", str(tmp_path / "missing.yaml"), "--address", ray_cluster], "no such file"),
    ]
    for args, match in cases:
        out = _vis4mer(*args)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert match in out.stderr, out.stderr


def test_upload_above_rays_limit_is_refused(tmp_path, monkeypatch):
    from orchestrator import jobs
    from orchestrator.config import ConfigError

    (tmp_path / "t.yaml").write_text("data: {uri: x}\n")
    (tmp_path / "big.bin").write_bytes(b"\0" * 4096)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "huge.bin").write_bytes(b"\0" * 8192)  # excluded: never counted, never sent
    monkeypatch.setattr(jobs, "upload_limit_bytes", lambda: 4000)
    with pytest.raises(ConfigError, match=r"above Ray's limit.*big.bin"):
        jobs.build_submission(str(tmp_path / "t.yaml"), [], working_dir=str(tmp_path))
    monkeypatch.setattr(jobs, "upload_limit_bytes", lambda: 5000)
    sub = jobs.build_submission(str(tmp_path / "t.yaml"), ["optim.lr=1e-3"], working_dir=str(tmp_path),
                                pip=["einops>=0.8"])
    assert sub.entrypoint == "python -m orchestrator.cli train t.yaml optim.lr=1e-3"
    assert sub.runtime_env["working_dir"] == str(tmp_path) and sub.runtime_env["pip"] == ["einops>=0.8"]
    assert {".git", ".venv", "data", "mlflow.db", "results"} <= set(sub.runtime_env["excludes"])
