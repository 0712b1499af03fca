"""Faults, bounded and loopback only: a Train worker killed mid-epoch, the S3 endpoint and the MLflow
server gone for seconds during training, a trial that raises. (A killed sweep driver is in
tests/test_sweep.py::test_sweep_lifecycle_asha_kill_resume_best_report.) docs/reliability.md maps
each guarantee to its test."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import yaml

from tests.support.runs import RAY_SESSION, ROOT, tiny_run
from tests.support.servers import MlflowServer, TcpProxy
from tests.support.sockets import is_loopback
from vis4mer.orchestrator.train.config import load_config


def tiny(uri: str, tmp_path, *extra: str) -> list[str]:
    """The shared tiny run with 4 steps an epoch and a checkpoint every epoch (faults land mid-run)."""
    return tiny_run(uri, tmp_path, "data.batch_size=4", "train.checkpoint_every=1", *extra)


def _metric_steps(client, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


@pytest.mark.ray
def test_worker_killed_mid_epoch_resumes_to_the_same_metrics(synthetic_dataset, tmp_path, ray_session):
    """SIGKILL the Train worker during epoch 3 of 5: Train restarts it from the epoch-2 checkpoint
    (train.max_failures=1); seeded, the run ends with the metrics of an uninterrupted run, in one MLflow
    run with every epoch logged once."""
    import mlflow

    from vis4mer.orchestrator.train.driver import run_training

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = tiny(synthetic_dataset, tmp_path, "train.epochs=5", "tracking.enabled=true", "data.cache=memory",
                  f"tracking.tracking_uri={uri}", "tracking.experiment=kill", "train.max_failures=1")
    clean = run_training(load_config(None, [*common, "run.name=clean"]))

    client = mlflow.tracking.MlflowClient(uri)
    killed = {}

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "pid" not in killed:
            runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id],
                                      filter_string="tags.`vis4mer.run_name` = 'killed'")
            if runs and len(_metric_steps(client, runs[0].info.run_id)) >= 2:  # epochs 0 and 1 done
                time.sleep(0.3)  # into epoch 2
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed["pid"] = pids[0]
                    killed["steps"] = _metric_steps(client, runs[0].info.run_id)
                    return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    out = run_training(load_config(None, [*common, "run.name=killed"]))
    t.join(10)
    assert "pid" in killed, "the worker was never killed"
    assert killed["steps"][-1] < 4, "killed too late to matter"
    for key in ("train_loss", "val_top1", "val_loss", "epoch"):
        assert out.metrics[key] == pytest.approx(clean.metrics[key], rel=1e-5, abs=1e-6), key
    runs = client.search_runs([client.get_experiment_by_name("kill").experiment_id],
                              filter_string="tags.`vis4mer.run_name` = 'killed'")
    assert len(runs) == 1 and runs[0].info.run_id == out.run_id and runs[0].info.status == "FINISHED"
    assert _metric_steps(client, out.run_id) == [0, 1, 2, 3, 4]  # no epoch lost, none logged twice


def _worker_stderr(since: float) -> str:
    """What the session's Ray workers wrote to stderr since `since` (log_to_driver is off in tests)."""
    logs = RAY_SESSION["dir"] / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.glob("worker-*.err") if p.stat().st_mtime >= since)


@pytest.mark.ray
def test_s3_and_mlflow_outages_during_training_are_survived(synthetic_dataset, tmp_path, ray_session,
                                                             s3_server, s3_bucket):
    """Data and checkpoints on S3 behind a proxy that goes down for 4 s at the first request of an
    epoch's data read, and again at the first request of a checkpoint write (both retried with
    backoff); then the MLflow server cut off (its own proxy resets every connection) until an epoch
    has ended without it: training goes on, a warning is printed, and the metrics logged meanwhile
    arrive once it is back, each epoch once. (Cut off, not stopped: an outage that ends at once, so
    that it cannot outlast the last epochs as a server restart on these sub-second epochs could.)"""
    import mlflow

    from vis4mer.orchestrator.train.driver import run_training

    bucket, fs = s3_bucket
    fs.put(synthetic_dataset + "/", f"{bucket}/data/", recursive=True)
    proxy = TcpProxy(s3_server.port)
    proxy.up()
    (tmp_path / "mlflow").mkdir()
    tracking = MlflowServer(tmp_path / "mlflow")
    tracking.start()
    tracking_proxy = TcpProxy(tracking.port)
    tracking_proxy.up()
    events: list[str] = []
    client = mlflow.tracking.MlflowClient(tracking.uri)
    deadline = time.monotonic() + 400

    def steps() -> list[int]:
        try:
            exp = client.get_experiment_by_name("outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            return _metric_steps(client, runs[0].info.run_id) if runs else []
        except Exception:  # the server is down: nothing to see
            return []

    def refused(methods: tuple[str, ...], prefix: str) -> list[str]:
        return [r for r in proxy.refused if r.split(" ")[0] in methods and f" /{bucket}/{prefix}" in r]

    def checkpoints() -> set[str]:
        """The checkpoints on S3 now (train.keep_last=2 deletes older ones: compare names, not counts)."""
        fs.invalidate_cache()
        return {p.rsplit("/", 1)[-1] for p in fs.find(f"{bucket}/runs/outage", withdirs=True)
                if p.rsplit("/", 1)[-1].startswith("checkpoint_")}

    def s3_outage_at(what: str, path: str) -> None:
        proxy.down_on(f" /{bucket}/{path}".encode())
        if proxy.tripped.wait(max(0.0, deadline - time.monotonic())):
            events.append(f"s3 down at {what}")
            time.sleep(4)
            proxy.up()
            events.append("s3 up")

    def chaos():
        while time.monotonic() < deadline and not steps():
            time.sleep(0.2)  # past the first epoch: the driver's own reads are done
        s3_outage_at("data read", "data/")
        s3_outage_at("checkpoint write", "runs/outage/checkpoint_")
        seen = len(steps())
        while time.monotonic() < deadline and len(steps()) <= seen:
            time.sleep(0.2)
        before = checkpoints()
        tracking_proxy.down()
        events.append("mlflow down")
        # An epoch logs, then checkpoints. The first new checkpoint may be an epoch's that logged just
        # before the cut; the next epoch logged after that checkpoint was written, so during the cut:
        # wait for its checkpoint too (train.keep_last=2 keeps both)
        while time.monotonic() < deadline and len(checkpoints() - before) < 2:
            time.sleep(0.2)
        tracking_proxy.up()
        events.append("mlflow up")

    t = threading.Thread(target=chaos, daemon=True)
    started = time.time()
    try:
        args = tiny(f"s3://{bucket}/data", tmp_path, "train.epochs=12", f"data.storage.endpoint_url={proxy.endpoint}",
                    f"run.storage_path=s3://{bucket}/runs", f"run.storage.endpoint_url={proxy.endpoint}",
                    "tracking.enabled=true", f"tracking.tracking_uri={tracking_proxy.endpoint}",
                    "tracking.experiment=outage",
                    "run.name=outage")
        t.start()
        out = run_training(load_config(None, args))
        t.join(120)
        assert events == ["s3 down at data read", "s3 up", "s3 down at checkpoint write", "s3 up",
                          "mlflow down", "mlflow up"], events
        assert refused(("GET", "HEAD"), "data/"), f"no data read was refused during the outages: {proxy.refused}"
        assert refused(("PUT", "POST"), "runs/outage/checkpoint_"), f"no checkpoint write was refused: {proxy.refused}"
        assert out.metrics["epoch"] == 11
        backlog = [m.value for m in client.get_metric_history(out.run_id, "tracking_backlog")]
        assert max(backlog) > 0, "no epoch ended while MLflow was down: the outage missed training"
        assert any("/api/2.0/mlflow/runs/log-batch" in r for r in tracking_proxy.refused), tracking_proxy.refused
        assert "warning: MLflow logging failed" in _worker_stderr(started)
        assert _metric_steps(client, out.run_id) == list(range(12))  # the backlog arrived, each epoch once
        assert client.get_run(out.run_id).info.status == "FINISHED"
        assert checkpoints()  # checkpoints kept going to S3
    finally:
        proxy.close()
        tracking_proxy.close()
        t.join(120)
        tracking.stop()


@pytest.mark.ray
def test_a_trial_that_raises_is_recorded_and_the_sweep_goes_on(synthetic_dataset, tmp_path, ray_session):
    import mlflow

    from vis4mer.orchestrator.sweep.spec import load_sweep
    from vis4mer.orchestrator.sweep.tune_run import run_sweep

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    d = {"name": "raises", "base": str(ROOT / "sweeps" / "train_synthetic.yaml"),
         "overrides": {"data.uri": synthetic_dataset, "run.storage_path": str(tmp_path / "runs"),
                       "data.cache": "memory", "tracking.tracking_uri": uri, "tracking.experiment": "raises",
                       "model.d_model": 16, "model.d_state": 8, "data.batch_size": 4, "train.epochs": 3,
                       "schedule.kind": "constant"},
         "search_space": {"train.fail_at_epoch": {"grid": [None, 1]}},
         "scheduler": {"kind": "fifo"}, "budget": {"num_samples": 1, "max_concurrent_trials": 2}}
    p = tmp_path / "raises.yaml"
    p.write_text(yaml.safe_dump(d))
    grid, plan = run_sweep(load_sweep(str(p)), progress=False)
    parent = plan.parent_run_id
    assert len(grid) == 2 and sum(1 for r in grid if r.error) == 1
    ok = next(r for r in grid if not r.error)
    assert ok.metrics["training_iteration"] == 3  # the other trial went on to the end
    client = mlflow.tracking.MlflowClient(uri)
    children = {r.data.tags["vis4mer.trial_id"]: r for r in client.search_runs(
        [client.get_experiment_by_name("raises").experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")}
    failed = [r for r in children.values() if r.info.status == "FAILED"]
    assert len(children) == 2 and len(failed) == 1
    assert "fault injected by train.fail_at_epoch=1" in failed[0].data.tags["vis4mer.error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(failed[0].info.run_id)}
    assert _metric_steps(client, failed[0].info.run_id) == [0]  # what it did before failing is kept


def test_checkpoints_load_with_weights_only():
    """Checkpoint loading never unpickles arbitrary objects."""
    sources = [p.read_text() for folder in ("orchestrator", "datasets", "model") for p in (ROOT / folder).rglob("*.py")]
    loads = [line for src in sources for line in src.splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for line in loads)


def test_secret_named_values_are_redacted_in_flattened_params():
    """Configs hold no credentials (they come from the environment), and any value under a key that
    names a secret is redacted before it reaches MLflow params or a printed config."""
    from vis4mer.orchestrator.train.config import flatten

    flat = flatten({"tracking": {"api_key": "k1", "uri": "http://x"}, "storage": {"secret_access_key": "k2",
                    "session_token": "k3", "password": "k4", "region": "eu"}})
    assert flat["tracking.api_key"] == flat["storage.secret_access_key"] == flat["storage.password"] == "***"
    assert flat["storage.session_token"] == "***"
    assert flat["tracking.uri"] == "http://x" and flat["storage.region"] == "eu"


@pytest.mark.ray
def test_the_local_ray_vis4mer_starts_listens_on_loopback_only(cli_train_run):
    """Everything `vis4mer train` starts itself (a local Ray: GCS, raylet, dashboard, agents,
    workers) listens on 127.0.0.1, none on 0.0.0.0 / [::]: every socket that started listening
    while it ran (the session's shared run). Ray binds the address it resolves for the node: inside
    the loopback-only namespace the tests and CI run in, that is 127.0.0.1 (on a host with a
    routable address Ray takes that one: docs/reliability.md).

    One exception, PyTorch's: the rank-0 Train worker's torch.distributed rendezvous store (the
    TCPStore behind Ray Train's env:// process group) binds every interface, since the other
    nodes' ranks must reach it; PyTorch offers no bind address. docs/reliability.md says so."""
    assert cli_train_run.returncode == 0, cli_train_run.stderr[-3000:]
    started = cli_train_run.listened
    assert len(started) >= 3, started  # GCS, raylet, dashboard at least
    wide = {sock: owner for sock, owner in started.items() if not is_loopback(sock[0])}
    assert all(owner.startswith("ray::RayTrainWorker") for owner in wide.values()), wide
    assert len(wide) <= 1, wide  # the one rendezvous store of the run's one process group


def test_metrics_pending_at_the_end_are_flushed_and_the_run_closed(mlflow_server, monkeypatch, capsys):
    """The MLflow server unreachable through the last epoch: the rank-0 logger keeps the metrics, and
    at the end of training sends them with a bounded retry; the driver closes the run the same way,
    and a server that stays down costs a warning, not the run (no Ray: the logger and the driver's
    call, as the loop and the driver make them)."""
    from mlflow.tracking import MlflowClient

    from vis4mer.orchestrator.train import tracking, worker
    from vis4mer.orchestrator.train.config import load_config

    port = int(mlflow_server.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    proxy.up()
    monkeypatch.setattr(worker, "FINAL_FLUSH_WAITS_S", (0.2, 0.2))
    monkeypatch.setattr(tracking, "FINISH_WAITS_S", (0.2, 0.2))
    try:
        client = MlflowClient(mlflow_server)
        exp = client.create_experiment(f"flush-{time.time_ns()}")
        run_id = client.create_run(exp).info.run_id
        logger = worker.MlflowEpochLogger(proxy.endpoint, run_id)
        logger.log({"train_loss": 1.0}, step=0)
        proxy.down()
        logger.log({"train_loss": 0.5}, step=1)  # the last epoch: the server is gone
        assert len(logger.pending) == 1
        assert logger.flush() is False  # still down after the retries: a warning
        assert "metrics were not logged" in capsys.readouterr().err
        cfg = load_config(None, ["data.uri=x", f"tracking.tracking_uri={proxy.endpoint}"])
        assert tracking.finish_run(cfg, run_id) is False
        proxy.up()
        assert logger.flush() is True and not logger.pending
        assert tracking.finish_run(cfg, run_id) is True
        assert [m.value for m in client.get_metric_history(run_id, "train_loss")] == [1.0, 0.5]
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        proxy.close()
