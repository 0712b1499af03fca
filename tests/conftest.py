"""Fixtures: real servers on loopback, one Ray instance per session, small datasets, one CLI run.

Everything here runs inside ../shared/tools/loopback (make test does): Ray rewrites 127.0.0.1 to
the machine's routable address otherwise. The helpers behind these fixtures are in tests/support/.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.runs import RAY_SESSION, SYNTHETIC_YAML, run_cli_watching_sockets, tiny_run
from tests.support.servers import MlflowServer, S3Server, free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train knobs for a test session's few-second runs on one machine (every Ray this session starts
# inherits them: the session's, `vis4mer` subprocesses', test_jobs' cluster nodes): the controller
# polls its workers every 0.5 s, not 2 s (a run ends ~2 polls after its last report), and starts
# no PreemptionWatcher actor (a node drain never happens here; one process fewer per run, ~1.3 s
# of CPU on this 2-core machine). Neither changes what the tests check.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Test credentials for the moto S3 server, set before Ray starts so that Train workers inherit
# them (as workers on a real cluster get theirs from their environment or instance identity).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test, made through s3fs (the path users' code takes)."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server.endpoint)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs.mkdir(name)
    yield name, fs
    fs.rm(name, recursive=True)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (each worker importing torch costs ~0.4 GiB)."""
    import ray
    from ray.data import DataContext

    # the dashboard (State API) is what frees the workers of a trial that Tune stops (ASHA)
    ctx = ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=True,
                   log_to_driver=False, logging_level="ERROR")
    RAY_SESSION["dir"] = Path(ctx.address_info["session_dir"])
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic_order dataset: 16 train videos of 32..40 frames x 2 tokens x 8 dims."""
    from vis4mer.datasets.synthetic import write_synthetic

    uri = str(tmp_path_factory.mktemp("data") / "synthetic_order")
    write_synthetic(uri, videos=(16, 8, 8), frames=40, min_frames=32, tokens=2, dim=8, seed=0)
    return uri


@pytest.fixture(scope="session")
def cli_train_run(synthetic_dataset, tmp_path_factory):
    """One `vis4mer train` end to end, as a user runs it: its own local Ray, the embedded MLflow
    store in its working dir, the listening sockets sampled while it runs. Shared by the test of
    what it prints and records and the test of what it listens on (a local Ray costs ~15 s here:
    one, not two)."""
    cwd = tmp_path_factory.mktemp("cli_train")
    overrides = tiny_run(synthetic_dataset, cwd, "train.epochs=1", "tracking.enabled=true", "run.name=cli")
    return run_cli_watching_sockets(["train", SYNTHETIC_YAML, *overrides], cwd)
