"""Ray job submission on a real two-node cluster whose Python has vis4mer's dependencies but not
vis4mer (`ray start --head` and `ray start --address`: own processes, own temp dirs, loopback):
`vis4mer submit` of a demo-style sweep whose trials train with one DDP worker on each node (vis4mer
travels as a wheel in the job's py_modules), polled until SUCCEEDED, results in MLflow, credentials
passed by name and never printed; `vis4mer jobs list|status|logs|stop`. Everything started is
stopped by PID."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.support.cluster import (
    kill_leftovers,
    python_without_vis4mer,
    ray_env,
    start_two_node_cluster,
    stop_group,
)
from tests.support.runs import ROOT, VIS4MER

SECRET = "s3cr3t-value-that-must-not-leak"


@pytest.fixture(scope="module")
def ray_cluster():
    """Head (3 CPUs, runs the job drivers) + worker node (3 CPUs); yields (dashboard URL, the nodes'
    python). Six CPUs hold two two-worker trials at once (each also keeps one CPU for Ray Data)."""
    # short: Ray's unix sockets live under the temp dir, and socket paths are limited to 107 bytes
    root = Path(tempfile.mkdtemp(prefix="v4r-", dir="/tmp"))
    procs: list = []
    try:
        python = python_without_vis4mer(root)
        address, procs = start_two_node_cluster(root, python)
        yield address, python
    finally:
        for p in reversed(procs):
            stop_group(p, grace_s=1)  # a throwaway cluster: `ray start --block` took 20 s to exit on SIGTERM,
            # and kill_leftovers below SIGKILLs whatever of it is still there
        kill_leftovers(str(root))
        shutil.rmtree(root, ignore_errors=True)


def _vis4mer(*args, timeout=120, env=None):
    return subprocess.run(VIS4MER + list(args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or ray_env())


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
    """`vis4mer submit sweeps/demo.yaml` to a cluster without vis4mer: the code goes as a wheel, the
    project's sweeps as working_dir. Scaled down on the command line: its depth/pooling schedule and
    lr fixed (its two state sizes remain: two trials, run at once), tiny widths, 2 epochs, and one
    DDP worker on each node (STRICT_SPREAD), so every trial spans the cluster."""
    ray_cluster, python = ray_cluster
    absent = subprocess.run([str(python), "-c", "import vis4mer.orchestrator"], capture_output=True, text=True,
                            timeout=60)
    assert absent.returncode != 0 and "No module named 'vis4mer'" in absent.stderr  # the cluster has no vis4mer
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = [f"data.uri={synthetic_dataset}", f"run.storage_path={tmp_path}/runs", f"tracking.tracking_uri={uri}",
                 "tracking.experiment=jobs", "model={n_layers: 2, pool: [2, 2]}", "optim.lr=3e-3", "model.d_model=16",
                 "data.batch_size=4", "train.epochs=2", "schedule.kind=constant", "scaling.num_workers=2",
                 "scaling.placement_strategy=STRICT_SPREAD"]
    env = dict(ray_env(), VIS4MER_TEST_TOKEN=SECRET)
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
    assert "python -m vis4mer.orchestrator.cli sweep sweeps/demo.yaml data.uri=" in listing.stdout
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
    ray_cluster, _ = ray_cluster
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
    ray_cluster, _ = ray_cluster
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
    from vis4mer.orchestrator.deploy import jobs
    from vis4mer.orchestrator.train.config import ConfigError

    wd, wheel_dir = tmp_path / "wd", tmp_path / "wheel"
    (wd / "data").mkdir(parents=True)
    wheel_dir.mkdir()
    (wd / "t.yaml").write_text("data: {uri: x}\n")
    (wd / "big.bin").write_bytes(b"\0" * 4096)
    (wd / "data" / "huge.bin").write_bytes(b"\0" * 8192)  # excluded: never counted, never sent
    monkeypatch.setattr(jobs, "upload_limit_bytes", lambda: 4000)
    with pytest.raises(ConfigError, match=r"above Ray's limit.*big.bin"):
        jobs.build_submission(str(wd / "t.yaml"), [], wheel_dir, working_dir=str(wd))
    monkeypatch.setattr(jobs, "upload_limit_bytes", lambda: 5000)
    sub = jobs.build_submission(str(wd / "t.yaml"), ["optim.lr=1e-3"], wheel_dir, working_dir=str(wd),
                                pip=["einops>=0.8"])
    assert sub.entrypoint == "python -m vis4mer.orchestrator.cli train t.yaml optim.lr=1e-3"
    assert sub.runtime_env["working_dir"] == str(wd) and sub.runtime_env["pip"] == ["einops>=0.8"]
    assert {".git", ".venv", "data", "mlflow.db", "results"} <= set(sub.runtime_env["excludes"])
    assert "/model" not in sub.runtime_env["excludes"]  # a user's own folder keeps its folders


def test_the_job_carries_vis4mer_as_a_wheel_and_the_project_without_its_code(tmp_path):
    """py_modules: a wheel of the installed vis4mer packages, no dependencies declared (Ray installs
    it with `pip install --target`); working_dir: the project without model/, datasets/,
    orchestrator/ (at the job's cwd they would shadow other packages of those names)."""
    import zipfile

    from vis4mer.orchestrator.deploy import jobs

    sub = jobs.build_submission(str(ROOT / "sweeps" / "demo.yaml"), [], tmp_path)
    (wheel,) = sub.runtime_env["py_modules"]
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"vis4mer/orchestrator/cli/__main__.py", "vis4mer/model/vis4mer.py", "vis4mer/datasets/format.py"} <= names
    assert not any(n.startswith(("model/", "datasets/", "orchestrator/", "vis4mer/__init__")) for n in names)
    assert "Requires-Dist" not in metadata
    assert {"/model", "/datasets", "/orchestrator"} <= set(sub.runtime_env["excludes"])
    _, largest = jobs.working_dir_size(ROOT, sub.runtime_env["excludes"])
    assert not any(p.split("/")[0] in ("model", "datasets", "orchestrator", "tests") for _, p in largest)
    (tmp_path / "again").mkdir()
    again = jobs.build_submission(str(ROOT / "sweeps" / "demo.yaml"), [], tmp_path / "again")
    assert Path(again.runtime_env["py_modules"][0]).read_bytes() == Path(wheel).read_bytes()  # same code, same bytes
