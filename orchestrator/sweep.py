"""Sweeps: a base training config, a search space, a scheduler and a budget, run on Ray Tune.

A sweep YAML (sweeps/*.yaml, the launch command in its first line):

    name: demo
    base: train_synthetic.yaml            # a training config, relative to this file
    overrides: {train.epochs: 8}          # applied to the base for every trial
    search_space:
      model.d_state: {grid: [16, 32]}     # grid | choice | uniform | loguniform | randint
      optim.lr: {loguniform: [1.0e-3, 1.0e-2]}
      model:                              # a choice of dicts sets several keys together
        choice: [{n_layers: 0}, {n_layers: 2, pool: [2, 2]}]
    scheduler: {kind: asha, grace_period: 2, reduction_factor: 2}   # or {kind: fifo}
    metric: val_top1                       # default: the dataset task's (val_top1 / val_mse)
    budget: {num_samples: 1, max_concurrent_trials: null, max_failures: 0}

Each trial is a driver function that launches a TorchTrainer and reports back through
`TuneReportCallback` (how Tune and Train V2 fit together). Trials have stable names
(`<sweep>-<trial id>`): their Train runs, checkpoints and MLflow child runs are found again when
an interrupted sweep is resumed. MLflow: one parent run per sweep, one child run per trial.
"""
from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import Config, ConfigError, load_config

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_TAG = "vis4mer.sweep"
DATA_CPUS_PER_TRIAL = 1
# max_failures: how often Tune restarts a trial whose driver died (a lost node); the restarted trial
# resumes its Train run from the last checkpoint under its stable name
BUDGET_KEYS = {"num_samples", "max_concurrent_trials", "max_failures"}


@dataclass
class SweepSpec:
    name: str
    base: str  # absolute path of the base training config
    overrides: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, dict] = field(default_factory=dict)
    scheduler: dict = field(default_factory=lambda: {"kind": "asha"})
    metric: str | None = None
    budget: dict = field(default_factory=lambda: {"num_samples": 1, "max_concurrent_trials": None})
    path: str | None = None

    def base_overrides(self, extra: list[str] | None = None) -> list[str]:
        return [f"{k}={_dot_value(v)}" for k, v in self.overrides.items()] + list(extra or [])


def _dot_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def _expand(key: str, value: Any) -> list[str]:
    """One sampled value -> dotlist overrides (a dict value sets several keys under `key`)."""
    if isinstance(value, dict):
        return [f"{key}.{k}={_dot_value(v)}" for k, v in value.items()]
    return [f"{key}={_dot_value(value)}"]


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Reads and validates a sweep YAML; `overrides` (key=value) apply to the base training config.
    An override of a searched key fixes it: `model.d_state=16` takes d_state out of the search space."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, base, search_space, scheduler, budget")
    unknown = set(raw) - {"name", "base", "overrides", "search_space", "scheduler", "metric", "budget"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    for k in ("name", "base", "search_space"):
        if k not in raw:
            raise ConfigError(f"{path}: {k}: required")
    spec = SweepSpec(name=str(raw["name"]), base=str((p.parent / raw["base"]).resolve()),
                     overrides=dict(raw.get("overrides") or {}), search_space=dict(raw["search_space"] or {}),
                     scheduler=dict(raw.get("scheduler") or {"kind": "asha"}), metric=raw.get("metric"),
                     budget={"num_samples": 1, "max_concurrent_trials": None, **(raw.get("budget") or {})}, path=str(p))
    pinned = []
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value")
        k, v = o.split("=", 1)
        spec.overrides[k] = yaml.safe_load(v)
        if spec.search_space.pop(k, None) is not None:  # given on the command line: fixed, not searched
            pinned.append(k)
    if pinned and not spec.search_space:
        raise ConfigError(f"{path}: overrides {', '.join(pinned)} fix every searched key: nothing left to sweep "
                          "(use vis4mer train for a single run)")
    validate_sweep(spec)
    return spec


def validate_sweep(spec: SweepSpec) -> None:
    where = spec.path or spec.name
    if not spec.name or "/" in spec.name:
        raise ConfigError(f"{where}: name {spec.name!r}: expected a name without '/'")
    if not spec.search_space:
        raise ConfigError(f"{where}: search_space: expected at least one key")
    for key, dist in spec.search_space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SPACE_KINDS:
            raise ConfigError(f"{where}: search_space.{key}: expected one of {{{', '.join(SPACE_KINDS)}: ...}}")
        kind, arg = next(iter(dist.items()))
        if kind in ("grid", "choice") and (not isinstance(arg, list) or not arg):
            raise ConfigError(f"{where}: search_space.{key}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(a, (int, float)) for a in arg) and arg[0] < arg[1]):
                raise ConfigError(f"{where}: search_space.{key}.{kind}: expected [low, high] with low < high")
            if kind == "loguniform" and arg[0] <= 0:
                raise ConfigError(f"{where}: search_space.{key}.loguniform: expected low > 0")
    s = spec.scheduler
    if s.get("kind") not in ("asha", "fifo"):
        raise ConfigError(f"{where}: scheduler.kind {s.get('kind')!r}: expected asha or fifo")
    unknown = set(s) - {"kind", "grace_period", "reduction_factor", "max_t"}
    if unknown:
        raise ConfigError(f"{where}: scheduler: unknown key {sorted(unknown)[0]!r}")
    b = spec.budget
    if set(b) - BUDGET_KEYS:
        raise ConfigError(f"{where}: budget: unknown key {sorted(set(b) - BUDGET_KEYS)[0]!r}")
    if not isinstance(b.get("max_failures", 0), int) or b.get("max_failures", 0) < 0:
        raise ConfigError(f"{where}: budget.max_failures={b['max_failures']!r}: expected an integer >= 0")
    if not isinstance(b["num_samples"], int) or b["num_samples"] < 1:
        raise ConfigError(f"{where}: budget.num_samples={b['num_samples']!r}: expected an integer >= 1")
    mct = b["max_concurrent_trials"]
    if mct is not None and (not isinstance(mct, int) or mct < 1):
        raise ConfigError(f"{where}: budget.max_concurrent_trials={mct!r}: expected an integer >= 1 or null (auto)")
    # every discrete combination must make a valid training config (no Ray needed)
    for overrides in discrete_overrides(spec):
        try:
            load_config(spec.base, spec.base_overrides(overrides))
        except ConfigError as e:
            raise ConfigError(f"{where}: trial with {' '.join(overrides) or 'the base config'}: {e}") from None


def discrete_overrides(spec: SweepSpec) -> list[list[str]]:
    """The cartesian product of grid and choice values, continuous keys at their lower bound."""
    axes = []
    for key, dist in spec.search_space.items():
        kind, arg = next(iter(dist.items()))
        values = arg if kind in ("grid", "choice") else [arg[0]]
        axes.append([_expand(key, v) for v in values])
    return [sum(combo, []) for combo in itertools.product(*axes)]


def trial_config(spec: SweepSpec, params: dict, extra: list[str]) -> Config:
    overrides = spec.base_overrides()
    for key, value in params.items():
        overrides += _expand(key, value)
    return load_config(spec.base, overrides + extra)


def param_space(spec: SweepSpec) -> dict:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
            "randint": lambda a: tune.randint(*a)}
    return {key: make[kind](arg) for key, dist in spec.search_space.items() for kind, arg in dist.items()}


def sweep_metric(spec: SweepSpec, base: Config) -> tuple[str, str]:
    from datasets.format import open_dataset
    from orchestrator.trainer import storage_options

    task = open_dataset(base.data.uri, storage_options(base.data.storage)).task
    metric = spec.metric or f"{base.data.eval_splits[0]}_{task.metric}"
    mode = "max" if metric.endswith("top1") or metric.endswith("acc") else "min"
    return metric, mode


def concurrency(spec: SweepSpec, base: Config) -> int:
    import ray

    if spec.budget["max_concurrent_trials"]:
        return spec.budget["max_concurrent_trials"]
    # A trial's driver holds almost no CPU (it waits on its TorchTrainer); its workers hold theirs, and one CPU
    # per trial stays free for Ray Data's read tasks, which would otherwise wait forever.
    workers = 1 if base.scaling.local_mode else base.scaling.num_workers
    per_trial = workers * base.scaling.cpus_per_worker + DATA_CPUS_PER_TRIAL
    resources = ray.cluster_resources()
    fits = int(resources.get("CPU", 1) // per_trial)
    if base.scaling.use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // workers))
    return max(1, fits)


def trial_count(spec: SweepSpec) -> int:
    """Trials the sweep creates: the grid's size times num_samples (choices and ranges are sampled)."""
    n = spec.budget["num_samples"]
    for dist in spec.search_space.values():
        kind, arg = next(iter(dist.items()))
        n *= len(arg) if kind == "grid" else 1
    return n


def absolute_local_paths(cfg: Config) -> dict[str, str]:
    """Overrides that pin the config's relative local paths to the driver's working directory.

    Tune runs each trial in a directory of its own, where `data/...` or the embedded MLflow store
    would resolve somewhere else."""
    from orchestrator.tracking import default_tracking_uri

    out = {}
    for key, value in (("data.uri", cfg.data.uri), ("run.storage_path", cfg.run.storage_path)):
        if "://" not in value and not os.path.isabs(value):
            out[key] = os.path.abspath(value)
    uri = cfg.tracking.tracking_uri
    if cfg.tracking.enabled and not uri:
        out["tracking.tracking_uri"] = default_tracking_uri()
    elif uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out["tracking.tracking_uri"] = "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    return out


def run_sweep(spec: SweepSpec, resume: bool = False, address: str | None = None, progress: bool = True):
    """Runs (or resumes) the sweep; returns (tune ResultGrid, parent MLflow run id)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestrator import tracking
    from orchestrator.sweep_callbacks import SweepProgress, TrialRunCloser
    from orchestrator.trainer import check_gpus, init_ray, prepare, run_training

    # Tune saves the sweep's state (which trials ended) at most this often (default: every >= 10 s).
    # A driver killed within that window would restart a trial that had just ended: keep it short.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")

    base = load_config(spec.base, spec.base_overrides())
    pinned = absolute_local_paths(base)
    if pinned:
        spec = replace(spec, overrides={**spec.overrides, **pinned})
        base = load_config(spec.base, spec.base_overrides())
    prepare(base)  # dataset and model checks before any Ray work
    metric, mode = sweep_metric(spec, base)
    check_gpus(base, init_ray(address, log_to_driver=not progress))
    parent = None
    if base.tracking.enabled:
        parent = tracking.get_or_create_parent(base, spec.name, {SWEEP_TAG: spec.name, "vis4mer.metric": metric},
                                               search_space=spec.search_space, resume=resume)
    from datasets.storage import filesystems
    from orchestrator.trainer import storage_options

    res = filesystems(base.run.storage_path, storage_options(base.run.storage))
    fs = None if res.scheme == "file" else res.pa  # Tune's experiment state beside the Train runs

    def trial_driver(params: dict) -> None:
        trial_id = tune.get_context().get_trial_id()
        name = f"{spec.name}-{trial_id}"
        cfg = trial_config(spec, params, [f"run.name={name}"])
        run_training(cfg, callbacks=[TuneReportCallback()], parent_run_id=parent,
                     extra_tags={SWEEP_TAG: spec.name, "vis4mer.trial_id": trial_id,
                                 "vis4mer.params": json.dumps(params, sort_keys=True)})

    epochs = base.train.epochs
    s = spec.scheduler
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=s.get("max_t", epochs),
                               grace_period=s.get("grace_period", 1), reduction_factor=s.get("reduction_factor", 2))
                 if s["kind"] == "asha" else FIFOScheduler())
    callbacks = [TrialRunCloser(base, spec.name, epochs)] if parent else []
    if progress:
        callbacks.append(SweepProgress(spec.name, metric, mode, epochs, total=trial_count(spec)))
    run_config = tune.RunConfig(name=spec.name, storage_path=res.path, storage_filesystem=fs, verbose=0,
                                callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=spec.budget.get("max_failures", 0)))
    trainable = tune.with_resources(trial_driver, {"CPU": 0.01})  # next to nothing: see concurrency()
    path = res.join(spec.name)
    if resume:
        if not tune.Tuner.can_restore(path, storage_filesystem=fs):
            raise ConfigError(f"sweep {spec.name!r}: nothing to resume at {res.uri(spec.name)}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space(spec),
                           tune_config=tune.TuneConfig(metric=metric, mode=mode, scheduler=scheduler,
                                                       num_samples=spec.budget["num_samples"],
                                                       max_concurrent_trials=concurrency(spec, base)),
                           run_config=run_config)
    grid = tuner.fit()
    if parent:
        tracking.summarise_parent(base, parent, grid, metric, mode)
    return grid, parent


def report_dir(name: str) -> str:
    """Where `vis4mer sweep` and `vis4mer report` save a sweep's plots locally."""
    return os.path.join("reports", name)
