"""A sweep's runs in MLflow, found from the tracking store alone (no Ray): what `vis4mer best` and
`vis4mer report` read. Reading never creates a store."""
from __future__ import annotations

from vis4mer.orchestrator.train.config import ConfigError
from vis4mer.orchestrator.train.tracking import Tag, check_tracking_uri, latest_run


def trial_params(run) -> dict:
    """A trial run's searched parameters (its params tag, JSON); a ConfigError naming the run when the
    tag is not a JSON object (a store edited by hand, or another tool's run)."""
    import json

    text = run.data.tags.get(Tag.PARAMS, "{}")
    try:
        params = json.loads(text)
    except (ValueError, RecursionError):
        params = None
    if not isinstance(params, dict):
        raise ConfigError(f"run {run.info.run_id}: tag {Tag.PARAMS} {text!r:.60}: expected a JSON object of the "
                          "trial's parameters")
    return params


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


def where(experiment: str | None) -> str:
    return f"experiment {experiment!r}" if experiment else "any experiment"


def latest_parent(client, exp_ids: list[str], sweep: str | None, tracking_uri: str, experiment: str | None):
    """The latest parent run of sweep `sweep` (running a sweep again makes a new one; refused if it
    has none), or of any sweep if `sweep` is None (then possibly None)."""
    filt = f"tags.`{Tag.SWEEP_PARENT}` = '{sweep}'" if sweep else f"tags.`{Tag.SWEEP_PARENT}` != ''"
    parent = latest_run(client, exp_ids, filt)
    if sweep and parent is None:
        raise ConfigError(f"sweep {sweep!r}: no parent run in {where(experiment)} at {tracking_uri}")
    return parent


def children(client, parent) -> list:
    """The trial runs of a sweep's parent run."""
    return client.search_runs([parent.info.experiment_id], max_results=5000,
                              filter_string=f"tags.`{Tag.PARENT}` = '{parent.info.run_id}'")


def sweep_runs(tracking_uri: str, experiment: str | None, sweep: str):
    """(client, parent run, child runs, metric) of a sweep's latest run."""
    from mlflow.tracking import MlflowClient

    check_tracking_uri(tracking_uri, reading=True)  # before the client, which would create an empty store
    client = MlflowClient(tracking_uri)
    exp_ids = experiment_ids(client, tracking_uri, experiment)
    parent = latest_parent(client, exp_ids, sweep, tracking_uri, experiment)
    return client, parent, children(client, parent), parent.data.tags.get(Tag.METRIC)
