"""A sweep on Ray Tune: one trial = one Ray Train run, tracked as an MLflow child run.

    spec = load_sweep("sweeps/demo.yaml")
    grid, plan = run_sweep(spec)

The driver resolves everything once, before any trial starts (`plan_sweep`): the base config (with
relative local paths pinned to the driver's working directory), the opened dataset, the metric and
its mode. Each trial gets that plan through `tune.with_parameters` and runs `run_trial`, the
module-level trial function: the base config with the trial's parameters applied, launched as a
TorchTrainer that reports back through `TuneReportCallback` (how Tune and Train V2 fit together).
Trials have stable names (`trial_name`): their Train runs, checkpoints and MLflow child runs are
found again when an interrupted sweep is resumed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

from vis4mer.datasets.format import FeatureDataset
from vis4mer.datasets.tasks import metric_mode
from vis4mer.orchestrator.sweep.spec import SweepSpec, trial_count, trial_name, trial_overrides
from vis4mer.orchestrator.train.config import Config, ConfigError, load_config, run_resources, with_overrides
from vis4mer.orchestrator.train.driver import prepare

TRIAL_DRIVER_CPUS = 0.01  # a trial's driver only waits on its TorchTrainer; its workers hold the CPUs


@dataclass
class SweepPlan:
    """What the sweep's driver resolved once and hands to every trial."""
    spec: SweepSpec
    base: Config  # the base config, its relative local paths made absolute
    dataset: FeatureDataset  # opened (manifest and shards checked) once for all trials
    metric: str
    mode: str  # "max" | "min"
    parent_run_id: str | None = None  # the sweep's MLflow parent run
    stop_reason: str | None = None  # set when the sweep ended at its budget


def absolute_local_paths(cfg: Config) -> list[str]:
    """Overrides that pin the config's relative local paths to the driver's working directory.

    Tune runs each trial in a directory of its own, where `data/...` or the embedded MLflow store
    would resolve somewhere else."""
    from vis4mer.orchestrator.train.tracking import default_tracking_uri

    out = []
    for key, value in (("data.uri", cfg.data.uri), ("run.storage_path", cfg.run.storage_path)):
        if "://" not in value and not os.path.isabs(value):
            out.append(f"{key}={os.path.abspath(value)}")
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.enabled and not uri:
        out.append(f"tracking.tracking_uri={default_tracking_uri()}")
    elif uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out.append("tracking.tracking_uri=sqlite:///" + os.path.abspath(uri[len("sqlite:///"):]))
    return out


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Loads the base config, opens the dataset and picks the metric, once (no Ray yet)."""
    base = load_config(spec.base, spec.base_overrides())
    pins = absolute_local_paths(base)
    if pins:
        base = with_overrides(base, pins)
    ds = prepare(base)  # dataset and model checks before any Ray work
    metric = spec.metric or f"{base.data.eval_splits[0]}_{ds.task.metric}"
    return SweepPlan(spec, base, ds, metric, metric_mode(metric))


def trial_config(plan: SweepPlan, params: dict, trial_id: str) -> Config:
    return with_overrides(plan.base, [*trial_overrides(params), f"run.name={trial_name(plan.spec.name, trial_id)}"])


def run_trial(params: dict, plan: SweepPlan) -> None:
    """The trial function (runs in the trial's own process): one Train run with this trial's params."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from vis4mer.orchestrator.train.driver import run_training
    from vis4mer.orchestrator.train.tracking import Tag

    trial_id = tune.get_context().get_trial_id()
    run_training(trial_config(plan, params, trial_id), callbacks=[TuneReportCallback()],
                 parent_run_id=plan.parent_run_id, ds=plan.dataset,
                 extra_tags={Tag.SWEEP: plan.spec.name, Tag.TRIAL_ID: trial_id,
                             Tag.PARAMS: json.dumps(params, sort_keys=True)})


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](arg) for key, dist in spec.search_space.items() for kind, arg in dist.items()}


def concurrency(spec: SweepSpec, base: Config) -> int:
    """Trials at once: budget.max_concurrent_trials, else the trials whose runs fit the cluster now."""
    import ray

    if spec.budget["max_concurrent_trials"]:
        return spec.budget["max_concurrent_trials"]
    need = run_resources(base.scaling)
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // need.cpus)
    if need.gpus:
        fits = min(fits, int(resources.get("GPU", 0) // need.gpus))
    return max(1, fits)


def run_sweep(spec: SweepSpec, resume: bool = False, address: str | None = None, progress: bool = True,
              plan: SweepPlan | None = None):
    """Runs (or resumes) the sweep; returns (tune ResultGrid, SweepPlan with the parent MLflow run id)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from vis4mer.datasets.storage import filesystems
    from vis4mer.orchestrator.sweep.budget import BudgetStopper, stop_reason
    from vis4mer.orchestrator.sweep.callbacks import SweepProgress, TrialRunCloser
    from vis4mer.orchestrator.train import tracking
    from vis4mer.orchestrator.train.driver import check_gpus, init_ray
    from vis4mer.orchestrator.train.tracking import Tag

    # Tune saves the sweep's state (which trials ended) at most this often (default: every >= 10 s).
    # A driver killed within that window would restart a trial that had just ended: keep it short.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

    plan = plan or plan_sweep(spec)
    base = plan.base
    check_gpus(base, init_ray(address, log_to_driver=not progress))
    if base.tracking.enabled:
        plan = replace(plan, parent_run_id=tracking.get_or_create_parent(
            base, spec.name, {Tag.SWEEP: spec.name, Tag.METRIC: plan.metric}, search_space=spec.search_space,
            resume=resume))

    res = filesystems(base.run.storage_path, base.run.storage)
    fs = None if res.scheme == "file" else res.pa  # Tune's experiment state beside the Train runs
    epochs = base.train.epochs
    s = spec.scheduler
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=s.get("max_t", epochs),
                               grace_period=s.get("grace_period", 1), reduction_factor=s.get("reduction_factor", 2))
                 if s["kind"] == "asha" else FIFOScheduler())
    need = run_resources(base.scaling)
    callbacks = [TrialRunCloser(base, spec.name, epochs, need, spec.budget)] if plan.parent_run_id else []
    if progress:
        callbacks.append(SweepProgress(spec.name, plan.metric, plan.mode, epochs, total=trial_count(spec)))
    limited = any(spec.budget.get(k) is not None for k in ("max_trial_hours", "max_sweep_cpu_hours",
                                                            "max_sweep_gpu_hours"))
    run_config = tune.RunConfig(name=spec.name, storage_path=res.path, storage_filesystem=fs, verbose=0,
                                callbacks=callbacks, stop=BudgetStopper(spec.budget, need) if limited else None,
                                failure_config=tune.FailureConfig(max_failures=spec.budget.get("max_failures", 0)))
    trainable = tune.with_resources(tune.with_parameters(run_trial, plan=plan), {"CPU": TRIAL_DRIVER_CPUS})
    path = res.join(spec.name)
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise ConfigError(f"sweep {spec.name!r}: nothing to resume at {res.uri(spec.name)}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec),
                           tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, scheduler=scheduler,
                                                       num_samples=spec.budget["num_samples"],
                                                       max_concurrent_trials=concurrency(spec, base)),
                           run_config=run_config)
    grid = tuner.fit()
    seconds = {r.metrics.get("trial_id", str(i)): float(r.metrics.get("time_total_s", 0.0))
               for i, r in enumerate(grid) if r.metrics}
    plan = replace(plan, stop_reason=stop_reason(seconds, need, spec.budget))
    if plan.parent_run_id:
        tracking.summarise_parent(base, plan.parent_run_id, grid, plan.metric, plan.mode, plan.stop_reason)
    return grid, plan
