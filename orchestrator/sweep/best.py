"""`vis4mer best`: the best trials of a sweep, from MLflow alone (no Ray needed).

Works from any machine that reaches the tracking server: it reads the child runs of the sweep's
latest parent run (a sweep run again without --resume is a new sweep), or every sweep's trials
without --sweep, ranks them by the metric, prints a table and writes the best trial's resolved
config (its `config.yaml` artifact) as a ready-to-run training YAML.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from vis4mer.datasets.tasks import metric_mode
from vis4mer.orchestrator.files import comment_lines, write_atomic
from vis4mer.orchestrator.sweep.lookup import children, experiment_ids, latest_parent, trial_params, where
from vis4mer.orchestrator.sweep.seeds import ConfigGroup, group_by_config, searches_seeds
from vis4mer.orchestrator.train.config import ConfigError
from vis4mer.orchestrator.train.tracking import Tag, check_tracking_uri


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    value: float
    params: dict
    status: str
    spend: dict = field(default_factory=dict)  # cpu_hours, gpu_hours and (with prices) cost, as logged


SPEND_METRICS = ("cpu_hours", "gpu_hours", "cost")  # what a trial's run logs when it ends (sweep/budget.py)


def best_trials(tracking_uri: str, experiment: str | None, sweep: str | None, metric: str | None,
                top: int | None = 5) -> tuple[str, str, list[TrialRow]]:
    """(metric, mode, the `top` trials ranked by the metric; all of them for top=None)."""
    from mlflow.tracking import MlflowClient

    check_tracking_uri(tracking_uri, reading=True)  # before the client, which would create an empty store
    client = MlflowClient(tracking_uri)
    exp_ids = experiment_ids(client, tracking_uri, experiment)
    parent = latest_parent(client, exp_ids, sweep, tracking_uri, experiment)
    if sweep:
        runs = children(client, parent)
    else:
        runs = client.search_runs(exp_ids, filter_string=f"tags.`{Tag.TRIAL_ID}` != ''", max_results=5000)
    if not runs:
        raise ConfigError(f"no sweep trials{' of ' + repr(sweep) if sweep else ''} in {where(experiment)} at "
                          f"{tracking_uri}")
    if metric is None:
        metric = parent.data.tags.get(Tag.METRIC) if parent else None
        if metric is None:
            raise ConfigError("no metric recorded for this sweep: pass --metric")
    mode = metric_mode(metric)
    rows: dict[str, TrialRow] = {}
    for r in runs:
        if metric not in r.data.metrics:
            continue
        tid = r.data.tags.get(Tag.TRIAL_ID, r.info.run_id)
        row = TrialRow(tid, r.info.run_id, r.data.metrics[metric], trial_params(r),
                       r.info.status, {k: r.data.metrics[k] for k in SPEND_METRICS if k in r.data.metrics})
        rows.setdefault(tid, row)  # one row per trial, even if a run was ever duplicated
    ranked = sorted(rows.values(), key=lambda t: t.value, reverse=(mode == "max"))
    if not ranked:
        raise ConfigError(f"no trial reported {metric!r}")
    return metric, mode, ranked[:top] if top else ranked


def rank_configs(rows: list[TrialRow], mode: str) -> list[ConfigGroup]:
    """Configurations (trials that differ only in train.seed) ranked by their mean over seeds; each
    group's members ranked too (members[0] is its best seed)."""
    groups = group_by_config(rows, lambda r: r.params, lambda r: r.value)
    for g in groups:
        order = sorted(range(g.count), key=lambda i: g.values[i], reverse=(mode == "max"))
        g.values, g.members = [g.values[i] for i in order], [g.members[i] for i in order]
    return sorted(groups, key=lambda g: g.mean, reverse=(mode == "max"))


def group_seeds(rows: list[TrialRow], requested: bool | None) -> bool:
    """--group-seeds, or by default when the search space has train.seed."""
    return searches_seeds([r.params for r in rows]) if requested is None else requested


def best_row(rows: list[TrialRow], mode: str, grouped: bool) -> TrialRow:
    """The winner: the best trial, or (grouped) the best seed of the configuration with the best mean."""
    return rank_configs(rows, mode)[0].members[0] if grouped else rows[0]


def print_ranking(tracking_uri: str, experiment: str | None, sweep: str | None, metric: str | None, top: int,
                  grouped: bool | None = None, prices: dict | None = None) -> TrialRow:
    """Prints the ranking (`vis4mer best`, and a sweep's end): trials, or configurations by their mean
    over seeds; with `prices`, the cost re-estimated from the logged hours. Returns the winner."""
    from vis4mer.orchestrator.sweep.budget import cost

    metric, mode, rows = best_trials(tracking_uri, experiment, sweep, metric, top=None)
    if prices:
        for r in rows:
            r.spend["cost"] = cost(r.spend, prices)
    grouped = group_seeds(rows, grouped)
    if grouped:
        groups = rank_configs(rows, mode)
        print(f"best configurations by mean {metric} over seeds ({mode}):")
        print(format_groups(metric, groups[:top]))
    else:
        print(f"best trials by {metric} ({mode}):")
        print(format_table(metric, rows[:top]))
    return best_row(rows, mode, grouped)


def download_run_config(client, run_id: str, dst: str | None = None) -> str:
    """The local path of a training run's resolved config (its `config.yaml` artifact); a ConfigError
    when it has none."""
    from mlflow.exceptions import MlflowException

    try:
        return client.download_artifacts(run_id, "config.yaml", dst)
    except MlflowException:
        raise ConfigError(f"run {run_id}: no config.yaml artifact (not a vis4mer training run)") from None


def write_best_config(tracking_uri: str, row: TrialRow, out: str) -> str:
    from mlflow.tracking import MlflowClient

    with open(download_run_config(MlflowClient(tracking_uri), row.run_id)) as f:
        body = f.read()
    lines = [ln for ln in body.splitlines() if not ln.strip().startswith("name:")]  # a fresh run name
    header = comment_lines([f"vis4mer train {out}",
                            f"best trial {row.trial_id} ({json.dumps(row.params, sort_keys=True)})"])
    write_atomic(out, header + "\n".join(lines) + "\n")
    return out


def _spend_cells(spend: dict) -> str:
    """cpu_h, gpu_h, cost: '-' where the run logged none (a trial still running, or no prices)."""
    return " ".join(f"{spend[k]:>8.4g}" if k in spend else f"{'-':>8}" for k in SPEND_METRICS)


def format_table(metric: str, rows: list[TrialRow]) -> str:
    """One line a trial: rank, trial id, metric, status, CPU-hours, GPU-hours, cost, parameters."""
    out = [f"{'rank':>4}  {'trial':<12} {metric:>12}  {'status':<8}  {'cpu_h':>8} {'gpu_h':>8} {'cost':>8}  params"]
    for i, r in enumerate(rows, 1):
        out.append(f"{i:>4}  {r.trial_id:<12} {r.value:>12.5g}  {r.status:<8}  {_spend_cells(r.spend)}  "
                   f"{json.dumps(r.params, sort_keys=True)}")
    return "\n".join(out)


def format_groups(metric: str, groups: list[ConfigGroup]) -> str:
    """One line a configuration: its mean +- std over seeds, how many, the spend of all its trials."""
    head = f"{metric} mean +- std"
    out = [f"{'rank':>4}  {head:>24} {'seeds':>5}  {'cpu_h':>8} {'gpu_h':>8} {'cost':>8}  best trial    params"]
    for i, g in enumerate(groups, 1):
        total: dict = {}
        for r in g.members:
            for k, v in r.spend.items():
                total[k] = total.get(k, 0.0) + v
        mean_std = f"{g.mean:.5g} +- {g.std:.3g}"
        out.append(f"{i:>4}  {mean_std:>24} {g.count:>5}  {_spend_cells(total)}  {g.members[0].trial_id:<12}  "
                   f"{json.dumps(g.params, sort_keys=True)}")
    return "\n".join(out)


@dataclass
class Trial:
    """A finished run found in MLflow: the best trial of a sweep, or a run by name."""
    run: object  # mlflow.entities.Run
    parent: object | None  # the sweep's parent run, when there is one
    metric: str  # the task's validation metric the run was ranked by (e.g. val_top1)
    cfg: object  # its resolved training config (vis4mer.orchestrator.train.config.Config)


def find_trial(tracking_uri: str, experiment: str | None, sweep: str | None = None, run: str | None = None,
               metric: str | None = None) -> Trial:
    """`sweep`: the best trial of its latest run (ranked as `vis4mer best` ranks); `run`: the latest
    run of that name (a trial's name is `<sweep>-<trial id>`). The store is only read."""
    import tempfile

    from mlflow.tracking import MlflowClient

    from vis4mer.orchestrator.train.config import load_config
    from vis4mer.orchestrator.train.tracking import latest_run

    check_tracking_uri(tracking_uri, reading=True)
    client = MlflowClient(tracking_uri)
    exp_ids = experiment_ids(client, tracking_uri, experiment)
    if sweep:
        metric, mode, rows = best_trials(tracking_uri, experiment, sweep, metric, top=None)
        found = client.get_run(best_row(rows, mode, group_seeds(rows, None)).run_id)
    else:
        found = latest_run(client, exp_ids, f"tags.`{Tag.RUN_NAME}` = '{run}'")
        if found is None:
            raise ConfigError(f"run {run!r}: not found in {where(experiment)} at {tracking_uri}")
    parent_id = found.data.tags.get(Tag.PARENT)
    parent = client.get_run(parent_id) if parent_id else None
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(download_run_config(client, found.info.run_id, tmp))
    metric = metric or (parent.data.tags.get(Tag.METRIC) if parent else None) or \
        f"{cfg.data.eval_splits[0]}_{_task_metric(found)}"
    return Trial(found, parent, metric, cfg)


def _task_metric(run) -> str:
    """top1 or mse, from the metrics the run logged."""
    return "mse" if any(k.endswith("_mse") for k in run.data.metrics) else "top1"
