"""`vis4mer best`: the best trials of a sweep, from MLflow alone (no Ray needed).

Works from any machine that reaches the tracking server: it reads the child runs of the sweep's
latest parent run (a sweep run again without --resume is a new sweep), or every sweep's trials
without --sweep, ranks them by the metric, prints a table and writes the best trial's resolved
config (its `config.yaml` artifact) as a ready-to-run training YAML.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from orchestrator.config import ConfigError


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    value: float
    params: dict
    status: str


def check_store(tracking_uri: str) -> None:
    """Reading never creates: a sqlite store that does not exist is an error, not a new empty file."""
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///"):]
        if not os.path.exists(path):
            raise ConfigError(f"--tracking-uri {tracking_uri}: no MLflow store there (no such file {path})")


def experiment_ids(client, tracking_uri: str, experiment: str | None) -> list[str]:
    """The named experiment, or every experiment of the store when none is named."""
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
        if not ids:
            raise ConfigError(f"no experiments at {tracking_uri}")
        return ids
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(f"experiment {experiment!r} not found at {tracking_uri}")
    return [exp.experiment_id]


def _where(experiment: str | None) -> str:
    return f"experiment {experiment!r}" if experiment else "any experiment"


def latest_parent(client, exp_ids: list[str], sweep: str | None, tracking_uri: str, experiment: str | None):
    """The latest parent run of sweep `sweep` (running a sweep again makes a new one; refused if it
    has none), or of any sweep if `sweep` is None (then possibly None)."""
    from orchestrator.tracking import latest_run

    filt = f"tags.`vis4mer.sweep_parent` = '{sweep}'" if sweep else "tags.`vis4mer.sweep_parent` != ''"
    parent = latest_run(client, exp_ids, filt)
    if sweep and parent is None:
        raise ConfigError(f"sweep {sweep!r}: no parent run in {_where(experiment)} at {tracking_uri}")
    return parent


def best_trials(tracking_uri: str, experiment: str | None, sweep: str | None, metric: str | None,
                top: int = 5) -> tuple[str, str, list[TrialRow]]:
    from mlflow.tracking import MlflowClient

    check_store(tracking_uri)  # before the client, which would create an empty store
    client = MlflowClient(tracking_uri)
    exp_ids = experiment_ids(client, tracking_uri, experiment)
    parent = latest_parent(client, exp_ids, sweep, tracking_uri, experiment)
    filt = f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'" if sweep else "tags.`vis4mer.trial_id` != ''"
    runs = client.search_runs(exp_ids, filter_string=filt, max_results=5000)
    if not runs:
        raise ConfigError(f"no sweep trials{' of ' + repr(sweep) if sweep else ''} in {_where(experiment)} at {tracking_uri}")
    if metric is None:
        metric = parent.data.tags.get("vis4mer.metric") if parent else None
        if metric is None:
            raise ConfigError("no metric recorded for this sweep: pass --metric")
    mode = "max" if metric.endswith(("top1", "acc")) else "min"
    rows: dict[str, TrialRow] = {}
    for r in runs:
        if metric not in r.data.metrics:
            continue
        tid = r.data.tags.get("vis4mer.trial_id", r.info.run_id)
        row = TrialRow(tid, r.info.run_id, r.data.metrics[metric], json.loads(r.data.tags.get("vis4mer.params", "{}")),
                       r.info.status)
        rows.setdefault(tid, row)  # one row per trial, even if a run was ever duplicated
    ranked = sorted(rows.values(), key=lambda t: t.value, reverse=(mode == "max"))
    if not ranked:
        raise ConfigError(f"no trial reported {metric!r}")
    return metric, mode, ranked[:top]


def write_best_config(tracking_uri: str, row: TrialRow, out: str) -> str:
    from mlflow.tracking import MlflowClient

    text = MlflowClient(tracking_uri).download_artifacts(row.run_id, "config.yaml")
    with open(text) as f:
        body = f.read()
    lines = [ln for ln in body.splitlines() if not ln.strip().startswith("name:")]  # a fresh run name
    with open(out, "w") as f:
        f.write(f"# vis4mer train {out}\n# best trial {row.trial_id} ({json.dumps(row.params, sort_keys=True)})\n")
        f.write("\n".join(lines) + "\n")
    return out


def format_table(metric: str, rows: list[TrialRow]) -> str:
    out = [f"{'rank':>4}  {'trial':<12} {metric:>12}  status    params"]
    for i, r in enumerate(rows, 1):
        out.append(f"{i:>4}  {r.trial_id:<12} {r.value:>12.5g}  {r.status:<8}  {json.dumps(r.params, sort_keys=True)}")
    return "\n".join(out)
