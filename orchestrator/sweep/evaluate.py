"""`vis4mer evaluate`: a finished trial's checkpoint on a split (test by default), with the task's
protocol, on Ray Data; the metrics go to the trial's MLflow run (and the best to its sweep's).

    metrics = evaluate_trial(find_trial(uri, None, sweep="demo"), split="test")   # {"test_top1": .., ..}
"""
from __future__ import annotations

from vis4mer.orchestrator.sweep.best import Trial


def evaluate_trial(trial: Trial, tracking_uri: str, split: str = "test", checkpoint: str = "best",
                   address: str | None = None) -> dict[str, float]:
    """Evaluates the trial's checkpoint on `split`; logs `<split>_<metric>` and `<split>_loss` to its
    run, `best_<split>_<metric>` to its sweep's parent run; returns them."""
    from mlflow.tracking import MlflowClient

    from vis4mer.datasets.format import open_dataset
    from vis4mer.orchestrator.train.driver import init_ray, load_model
    from vis4mer.orchestrator.train.inference import predict_split, split_metrics

    cfg = trial.cfg
    ds = open_dataset(cfg.data.uri, cfg.data.storage)
    ds.require_split(split, f"--split {split}")
    model = load_model(cfg, checkpoint, ds)  # before Ray: a missing checkpoint is one line
    init_ray(address, log_to_driver=False)
    result = split_metrics(predict_split(model, ds, split, batch_size=cfg.data.eval_batch_size), ds.task)
    metrics = {f"{split}_{ds.task.metric}": result[ds.task.metric], f"{split}_loss": result["loss"]}
    client = MlflowClient(tracking_uri)
    for key, value in metrics.items():
        client.log_metric(trial.run.info.run_id, key, value)
    key = f"{split}_{ds.task.metric}"
    if trial.parent is not None:
        client.log_metric(trial.parent.info.run_id, f"best_{key}", metrics[key])
    return metrics
