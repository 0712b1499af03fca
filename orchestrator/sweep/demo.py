"""The main job (`make demo`): the demo sweep on embedded defaults.

Local Ray, the local MLflow store (sqlite:///$PWD/mlflow.db) and local synthetic data: the
temporal-order task (which of two events, far apart in a noisy clip, comes first) is written to
`data/synthetic_order` if it is absent, then `sweeps/demo.yaml` runs: 8 trials over the state size,
the pooling schedule and the depth, with ASHA. The depth-0 trial feeds mean-pooled features
straight into the head: the order is invisible to it, so it stays near chance, while the S4 trials
solve the task.
"""
from __future__ import annotations

import os

from vis4mer.orchestrator.files import PROJECT_ROOT

DEMO_SWEEP = PROJECT_ROOT / "sweeps" / "demo.yaml"


def ensure_demo_data(uri: str) -> bool:
    """Writes the demo dataset at `uri` if none is there; True when it did."""
    from vis4mer.datasets.format import DatasetError, open_dataset
    from vis4mer.datasets.synthetic import write_synthetic

    try:
        open_dataset(uri)
        print(f"demo data: {uri} (present)", flush=True)
        return False
    except DatasetError:
        if os.path.exists(os.path.join(uri, "manifest.json")):
            raise  # a damaged dataset is the user's to look at, not to overwrite
        m = write_synthetic(uri, task="synthetic_order", videos=(2048, 128, 128))
        print(f"demo data: wrote {uri} ({m.split_rows()})", flush=True)
        return True


def _remove_written(target, existed: bool) -> None:
    """Takes back the demo dataset this run wrote (the writer wrote only into an absent or empty
    target, a storage.Resolved): its folder's contents, and the folder if there was none."""
    fs = target.fs
    for entry in fs.ls(target.path, detail=False):
        fs.rm(entry, recursive=True)
    if not existed:
        fs.rm(target.path, recursive=True)


def run_demo_sweep(data_uri: str = "data/synthetic_order", overrides: list[str] | None = None,
                   address: str | None = None) -> int:
    from vis4mer.datasets.errors import UserError
    from vis4mer.datasets.storage import filesystems
    from vis4mer.orchestrator.sweep.spec import load_sweep, trial_count
    from vis4mer.orchestrator.sweep.summary import print_sweep_results
    from vis4mer.orchestrator.sweep.tune_run import plan_sweep, run_sweep
    from vis4mer.orchestrator.train.config import load_config
    from vis4mer.orchestrator.train.tracking import check_tracking_uri, tracking_uri

    spec = load_sweep(str(DEMO_SWEEP), [f"data.uri={data_uri}", *(overrides or [])])
    base = load_config(spec.base, spec.base_overrides())  # the config's own errors before any data is written
    if base.tracking.enabled:
        check_tracking_uri(tracking_uri(base))
    target = filesystems(data_uri)
    existed = target.fs.exists(target.path)
    wrote = ensure_demo_data(data_uri)
    try:
        plan = plan_sweep(spec)  # the checks against the dataset (batch size, the model at its length)
    except UserError:
        if wrote:
            _remove_written(target, existed)
        raise
    print(f"vis4mer demo: sweep {spec.name!r}, {trial_count(spec)} trials (ASHA); "
          "chance on this task is 50 %", flush=True)
    grid, plan = run_sweep(spec, address=address, plan=plan)
    print(f"mlflow parent run id: {plan.parent_run_id}")
    print_sweep_results(plan, top=8)
    metric = plan.metric
    by_depth: dict[int, float] = {}
    for r in grid:
        if r.metrics and metric in r.metrics:
            depth = int(r.config["model"]["n_layers"]) if isinstance(r.config.get("model"), dict) else -1
            by_depth[depth] = max(by_depth.get(depth, 0.0), float(r.metrics[metric]))
    summary = ", ".join(f"depth {d}: {v:.1%}" for d, v in sorted(by_depth.items()))
    print(f"best {metric} per depth: {summary}")
    print("see them in MLflow: mlflow ui --backend-store-uri sqlite:///mlflow.db")
    print(next_steps(spec.name, data_uri))
    return 0


def next_steps(sweep: str, data_uri: str) -> str:
    """What a team does after a sweep, as commands to copy (printed, not run)."""
    model = f"vis4mer-{sweep}"
    return "\n".join([
        "next steps (the winner's test numbers, the registry, predictions):",
        f"  vis4mer evaluate --sweep {sweep} --split test",
        f"  vis4mer promote --sweep {sweep} --model-name {model} --alias champion",
        f"  vis4mer predict --model models:/{model}@champion --data {data_uri} --split test --out preds.parquet"])
