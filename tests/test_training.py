"""Training on Ray Train: config validation, local mode, DDP equivalence, a two-node cluster,
a real MLflow server, checkpoints on S3 and a run that resumes from them."""
from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.support.runs import ROOT, VIS4MER
from tests.support.runs import tiny_run as tiny
from vis4mer.orchestrator.train.config import ConfigError, load_config

pytestmark = pytest.mark.ray


# --- config: every check before any Ray work ------------------------------------------------


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"),
    ("train.epochs=ten", "train.epochs: Value 'ten' of type 'str' could not be converted to Integer"),
    ("optim.lr=-0.1", r"optim.lr=-0.1: expected > 0"),
    ("scaling.num_workers=0", r"scaling.num_workers=0: expected >= 1"),
    ("data.batch_size=0",
     r"data.batch_size=0: expected a positive multiple of scaling.num_workers x optim.grad_accum = 1"),
    ("schedule.kind=step", "schedule.kind='step': expected plateau, cosine or constant"),
    ("optimlr", "override 'optimlr': expected key=value"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(str(ROOT / "sweeps" / "train_synthetic.yaml"), [override])


def test_schedule_too_deep_and_missing_gpu_are_refused(synthetic_dataset, tmp_path, ray_session):
    from vis4mer.orchestrator.train.driver import prepare, run_training

    cfg = load_config(None, tiny(synthetic_dataset, tmp_path, "model.n_layers=8", "model.d_model=1024"))
    with pytest.raises(ConfigError,
                       match=r"model: stage 6: pooling length 1 by 2 leaves no time step.*sequence length 80"):
        prepare(cfg)
    cfg = load_config(None, tiny(synthetic_dataset, tmp_path, "scaling.use_gpu=true"))
    with pytest.raises(ConfigError, match="scaling.use_gpu=true with 1 worker.*the cluster has 0 GPU"):
        run_training(cfg)
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_a_diverged_loss_is_the_worst_for_the_scheduler():
    """NaN would never be stopped by ASHA (NaN < cutoff is false): a diverged loss is +inf."""
    import math
    import types

    from ray.tune.schedulers import AsyncHyperBandScheduler

    from vis4mer.orchestrator.train.worker import diverged_is_worst

    m = diverged_is_worst({"train_loss": math.nan, "val_mse": math.nan, "val_top1": 0.5, "epoch": 1})
    assert m["train_loss"] == math.inf and m["val_mse"] == math.inf and m["val_top1"] == 0.5
    # what ASHA then does with it: compared at the rung against a finite loss, the diverged trial stops
    asha = AsyncHyperBandScheduler(metric="train_loss", mode="min", grace_period=1, reduction_factor=2, max_t=4)
    bracket = asha._brackets[0]
    trial = lambda name: types.SimpleNamespace(trial_id=name)  # noqa: E731
    assert bracket.on_result(trial("good"), 1, -0.5) == "CONTINUE"  # mode min: Tune passes -loss
    assert bracket.on_result(trial("nan"), 1, -math.nan) == "CONTINUE"  # NaN slips through
    assert bracket.on_result(trial("diverged"), 1, -m["train_loss"]) == "STOP"


def test_every_shipped_training_yaml_validates():
    files = sorted(glob.glob(str(ROOT / "sweeps" / "train_*.yaml")))
    assert files
    for f in files:
        assert Path(f).read_text().startswith("# vis4mer train "), f  # the launch command comes first
        load_config(f)


def test_cli_train_bad_config_exits_2_without_traceback(tmp_path):
    out = subprocess.run([*VIS4MER, "train", str(ROOT / "sweeps" / "train_synthetic.yaml"), "optim.lr=-1"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "vis4mer train: error: optim.lr=-1.0: expected > 0"


# --- training ----------------------------------------------------------------------------------


def final_state(outcome) -> dict:
    return torch.load(os.path.join(outcome.checkpoint_path, "state.pt"), weights_only=True)


def test_local_mode(synthetic_dataset, tmp_path, ray_session):
    from vis4mer.orchestrator.train.driver import run_training

    cfg = load_config(None, tiny(synthetic_dataset, tmp_path, "scaling.local_mode=true", "run.name=local"))
    out = run_training(cfg)
    assert out.metrics["epoch"] == 1 and out.metrics["steps"] == 1
    for key in ("train_loss", "train_acc", "val_loss", "val_top1", "lr", "clips_per_s", "tokens_per_s",
                "data_wait_frac", "peak_mem_gb"):
        assert key in out.metrics, key
    assert 0 <= out.metrics["val_top1"] <= 1 and 0 <= out.metrics["data_wait_frac"] <= 1
    # local mode keeps no Ray checkpoints; the best state is written to the run's storage all the same
    best = Path(out.best_uri)
    state = torch.load(best / "state.pt", weights_only=True)
    assert state["epoch"] in (0, 1) and set(state) >= {"model", "optimizer", "scheduler", "torch_rng", "best"}
    assert (best / "config.yaml").read_text().count("local_mode: true") == 1


def test_two_worker_ddp_equals_one_process(synthetic_dataset, tmp_path, ray_session):
    """Global batch = the 16 training videos: each step sees the same examples either way."""
    from vis4mer.orchestrator.train.driver import run_training

    one = run_training(load_config(None, tiny(synthetic_dataset, tmp_path, "run.name=one", "scaling.num_workers=1")))
    two = run_training(load_config(None, tiny(synthetic_dataset, tmp_path, "run.name=two", "scaling.num_workers=2",
                                              "scaling.cpus_per_worker=1")))
    a, b = final_state(one)["model"], final_state(two)["model"]
    init = load_config(None, tiny(synthetic_dataset, tmp_path))
    moved = 0.0
    for k in a:
        rel = ((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item()
        assert rel <= 1e-5, (k, rel)
    # and training did move the parameters (2 steps of lr 0.01)
    from vis4mer.datasets.format import open_dataset
    from vis4mer.model import ViS4mer
    from vis4mer.orchestrator.train.config import model_config
    torch.manual_seed(init.train.seed)
    fresh = ViS4mer(model_config(init.model, open_dataset(synthetic_dataset).task)).state_dict()
    moved = max(((a[k] - fresh[k]).norm() / fresh[k].norm().clamp_min(1e-12)).item() for k in a)
    assert moved > 1e-3
    assert one.metrics["steps"] == two.metrics["steps"] == 1


def test_mlflow_server_s3_checkpoints_and_resume(synthetic_dataset, tmp_path, ray_session, mlflow_server,
                                                 s3_server, s3_bucket):
    import mlflow
    import mlflow.pyfunc

    from vis4mer.orchestrator.train.driver import load_best_model, run_training

    bucket, fs = s3_bucket
    args = tiny(synthetic_dataset, tmp_path, "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
                "tracking.experiment=resume-test", "run.name=resumable", f"run.storage_path=s3://{bucket}/runs",
                f"run.storage.endpoint_url={s3_server.endpoint}", "train.keep_last=1", "train.epochs=2")
    first = run_training(load_config(None, args))
    assert fs.ls(f"{bucket}/runs/resumable")  # checkpoints went to the S3 endpoint
    assert any("best" in p for p in fs.ls(f"{bucket}/runs/resumable"))

    # same name, more epochs: resumes from the epoch-1 checkpoint, into the same MLflow run
    second = run_training(load_config(None, [*args, "train.epochs=3"]))
    assert second.run_id == first.run_id and second.metrics["epoch"] == 2
    ckpts = [p for p in fs.ls(f"{bucket}/runs/resumable") if p.split("/")[-1].startswith("checkpoint_2")]
    assert len(ckpts) == 1  # keep_last=1

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["resume-test"])
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED" and run["params.optim.lr"] == "0.01" and run["params.model.d_state"] == "8"
    assert len(run["tags.vis4mer.dataset_manifest_sha256"]) == 64 and run["tags.vis4mer.ray_job_id"]
    client = mlflow.tracking.MlflowClient(mlflow_server)
    history = client.get_metric_history(first.run_id, "val_top1")
    assert sorted(m.step for m in history) == [0, 1, 2]  # each epoch once: the resume did not repeat one
    artifacts = {a.path for a in client.list_artifacts(first.run_id)}
    assert "config.yaml" in artifacts
    logged = client.search_logged_models(experiment_ids=[run["experiment_id"]])
    best_logged = next(m for m in logged if m.source_run_id == first.run_id)  # the best checkpoint as an MLflow model
    reqs = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{best_logged.model_id}")).read_text().split()
    assert {r.split("==")[0] for r in reqs} >= {"torch", "vis4mer", "cloudpickle"}  # stated, not inferred
    import mlflow.pytorch

    loaded = mlflow.pytorch.load_model(f"models:/{best_logged.model_id}")
    assert type(loaded).__module__ == "vis4mer.model.vis4mer"  # loads by the vis4mer name, no top-level `model`
    best = load_best_model(load_config(None, args), second.best_uri)
    assert best is not None and sum(p.numel() for p in best.parameters()) > 0


def test_cli_train_prints_progress_run_id_and_final_metrics(cli_train_run):
    """`vis4mer train` end to end: its own local Ray, the embedded MLflow store in the working dir."""
    out = cli_train_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert "epoch 1/1" in out.stdout + out.stderr  # the controller's progress line
    run_id = next(ln.split(": ")[1] for ln in out.stdout.splitlines() if ln.startswith("mlflow run id: "))
    assert "final metrics: {'epoch': 0" in out.stdout
    import mlflow
    run = mlflow.tracking.MlflowClient(f"sqlite:///{out.cwd}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED" and "val_top1" in run.data.metrics


def test_compiled_training_matches_eager(synthetic_dataset, tmp_path, ray_session):
    """train.compile=true: the same two steps through torch.compile (inductor, in local mode so that
    the compile happens in this process and its graphs can be counted) give the eager run's weights."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from vis4mer.orchestrator.train.driver import run_training

    eager = run_training(load_config(None, tiny(synthetic_dataset, tmp_path, "scaling.local_mode=true",
                                                "run.name=eager")))
    torch._dynamo.reset()
    counters.clear()
    compiled = run_training(load_config(None, tiny(synthetic_dataset, tmp_path, "scaling.local_mode=true",
                                                   "run.name=compiled", "train.compile=true")))
    assert counters["stats"]["unique_graphs"] >= 1  # the step really went through dynamo
    # local mode keeps no Ray checkpoints: the best states (the same epoch's, if the runs agree)
    sa, sb = (torch.load(Path(o.best_uri) / "state.pt", weights_only=True) for o in (eager, compiled))
    assert sa["epoch"] == sb["epoch"]
    for k in sa["model"]:
        a, b = sa["model"][k], sb["model"][k]
        rel = ((a - b).norm() / a.norm().clamp_min(1e-12)).item()
        assert rel <= 1e-4, (k, rel)
    assert compiled.metrics["train_loss"] == pytest.approx(eager.metrics["train_loss"], rel=1e-4)
