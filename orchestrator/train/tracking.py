"""MLflow on the driver: the run (explicit id, found again by name on resume), params, tags,
artifacts. Workers only log metrics into the run id they are given (worker.MlflowEpochLogger).

Embedded default: a sqlite store in the working directory (MLflow refuses plain `file:` stores).
"""
from __future__ import annotations

import hashlib
import os
import subprocess

from vis4mer.orchestrator.files import PROJECT_ROOT
from vis4mer.orchestrator.train.config import Config, config_yaml, flatten, to_dict


class Tag:
    """The MLflow tag names vis4mer writes and searches by."""
    RUN_NAME = "vis4mer.run_name"  # a run's stable name: a resumed run finds its MLflow run by it
    PARENT = "mlflow.parentRunId"  # MLflow's own: a sweep's trials under the sweep's parent run
    SWEEP_PARENT = "vis4mer.sweep_parent"  # on a sweep's parent run: the sweep's name
    SWEEP = "vis4mer.sweep"  # on a trial's run: its sweep's name
    TRIAL_ID = "vis4mer.trial_id"
    PARAMS = "vis4mer.params"  # a trial's sampled parameters, JSON
    METRIC = "vis4mer.metric"  # on a sweep's parent run: the metric that ranks its trials
    STOPPED_EARLY = "vis4mer.stopped_early"  # "true" when the scheduler ended the trial early
    ERROR = "vis4mer.error"  # the last line of a failed run's error
    DATASET = "vis4mer.dataset"
    MANIFEST_SHA256 = "vis4mer.dataset_manifest_sha256"
    TASK = "vis4mer.task"
    GIT_COMMIT = "vis4mer.git_commit"
    RAY_JOB_ID = "vis4mer.ray_job_id"


def default_tracking_uri() -> str:
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=PROJECT_ROOT)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def manifest_hash(manifest_json: str) -> str:
    return hashlib.sha256(manifest_json.encode()).hexdigest()


def _experiment_id(client, cfg: Config, create: bool = True) -> str | None:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.tracking.experiment) if create else None


def latest_run(client, exp_ids: list[str], filter_string: str):
    """The most recently started run matching `filter_string` (a run or sweep started again has a
    newer one), or None."""
    found = client.search_runs(exp_ids, filter_string=filter_string, max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _find_run(client, exp_id: str | None, tag: str, value: str):
    """The run whose `tag` equals `value` (how a resumed run or sweep finds its own again), or None."""
    return None if exp_id is None else latest_run(client, [exp_id], f"tags.`{tag}` = '{value}'")


def get_or_create_run(cfg: Config, name: str, tags: dict, parent_run_id: str | None = None) -> str:
    """The MLflow run for this run name: the existing one (a resumed run logs into it) or a new one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg)
    found = _find_run(client, exp_id, Tag.RUN_NAME, name)
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {Tag.RUN_NAME: name, **{k: str(v) for k, v in tags.items() if v is not None}}
    if parent_run_id:
        all_tags[Tag.PARENT] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    params = flatten(to_dict(cfg))  # secrets redacted by key name
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_text(run.info.run_id, config_yaml(cfg), "config.yaml")
    return run.info.run_id


def finish_run(cfg: Config, run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    if status == "FAILED" and client.get_run(run_id).info.status != "RUNNING":
        return  # already closed, e.g. by the sweep when its scheduler stopped the trial (then ended it)
    client.set_terminated(run_id, status=status)


def log_best_model(cfg: Config, run_id: str, model) -> None:
    """The best checkpoint as an MLflow PyTorch model (artifact `best_model`)."""
    from importlib.metadata import version

    import mlflow
    import mlflow.pytorch

    # Stated, not inferred: inference loads the model in a subprocess to see what it imports
    # (~4 s of CPU at the end of every run) and finds these same packages.
    reqs = mlflow.pytorch.get_default_pip_requirements() + [f"vis4mer=={version('vis4mer')}"]
    mlflow.set_tracking_uri(tracking_uri(cfg))
    with mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(model, name="best_model", serialization_format="pickle", pip_requirements=reqs)


def get_or_create_parent(cfg: Config, sweep: str, tags: dict, search_space: dict, resume: bool = False) -> str:
    """The sweep's parent run: a new one for each fresh run of the sweep (running it again starts a
    new sweep, as Tune does), found again by its sweep tag (the latest) when the sweep is resumed."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg)
    found = _find_run(client, exp_id, Tag.SWEEP_PARENT, sweep) if resume else None
    if found:
        return found.info.run_id
    run = client.create_run(exp_id, run_name=sweep, tags={Tag.SWEEP_PARENT: sweep, **tags,
                                                          Tag.GIT_COMMIT: git_commit() or ""})
    client.log_text(run.info.run_id, json.dumps(search_space, indent=2), "search_space.json")
    client.log_text(run.info.run_id, config_yaml(cfg), "base_config.yaml")
    return run.info.run_id


def summarise_parent(cfg: Config, parent_id: str, grid, metric: str, mode: str) -> None:
    """Best config and a summary table (one row per trial) on the parent run."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id"), "config": r.config, metric: m.get(metric),
                     "epochs": m.get("training_iteration"), "error": str(r.error) if r.error else None})
    client.log_text(parent_id, json.dumps(rows, indent=2, default=str), "summary.json")
    try:
        best = grid.get_best_result(metric=metric, mode=mode)
        client.log_text(parent_id, json.dumps(best.config, indent=2, default=str), "best_config.json")
        if best.metrics and metric in best.metrics:
            client.log_metric(parent_id, f"best_{metric}", float(best.metrics[metric]))
    except RuntimeError:
        pass  # no trial reported the metric
    client.set_terminated(parent_id, status="FINISHED")


def close_run_by_name(cfg: Config, name: str, status: str, tags: dict, error: str | None = None) -> str | None:
    """Ends the run called `name` (if it exists) with `status`, its tags and, for a failure, the error."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    found = _find_run(client, _experiment_id(client, cfg, create=False), Tag.RUN_NAME, name)
    if not found:
        return None
    run_id = found.info.run_id
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    if error:
        lines = [ln for ln in error.strip().splitlines() if ln.strip()]
        client.set_tag(run_id, Tag.ERROR, (lines[-1] if lines else error)[:500])
        client.log_text(run_id, error, "error.txt")
    client.set_terminated(run_id, status=status)
    return run_id
