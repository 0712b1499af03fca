"""`vis4mer best`: the best trials of a sweep, from MLflow alone (no Ray needed).

Works from any machine that reaches the tracking server: it reads the child runs of the sweep's
latest parent run (a sweep run again without --resume is a new sweep), or every sweep's trials
without --sweep, ranks them by the metric, prints a table and writes the best trial's resolved
config (its `config.yaml` artifact) as a ready-to-run training YAML.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from vis4mer.datasets.tasks import metric_mode
from vis4mer.orchestrator.files import write_atomic
from vis4mer.orchestrator.sweep.lookup import children, experiment_ids, latest_parent, where
from vis4mer.orchestrator.train.config import ConfigError
from vis4mer.orchestrator.train.tracking import Tag, check_tracking_uri


@dataclass
class TrialRow:
    trial_id: str
    run_id: str
    value: float
    params: dict
    status: str


def best_trials(tracking_uri: str, experiment: str | None, sweep: str | None, metric: str | None,
                top: int = 5) -> tuple[str, str, list[TrialRow]]:
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
        row = TrialRow(tid, r.info.run_id, r.data.metrics[metric], json.loads(r.data.tags.get(Tag.PARAMS, "{}")),
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
    header = f"# vis4mer train {out}\n# best trial {row.trial_id} ({json.dumps(row.params, sort_keys=True)})\n"
    write_atomic(out, header + "\n".join(lines) + "\n")
    return out


def format_table(metric: str, rows: list[TrialRow]) -> str:
    out = [f"{'rank':>4}  {'trial':<12} {metric:>12}  status    params"]
    for i, r in enumerate(rows, 1):
        out.append(f"{i:>4}  {r.trial_id:<12} {r.value:>12.5g}  {r.status:<8}  {json.dumps(r.params, sort_keys=True)}")
    return "\n".join(out)
