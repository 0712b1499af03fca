"""`vis4mer evaluate`, `promote` and `predict`: after the sweep, the winner's test numbers, the
MLflow Model Registry, and batch predictions on Ray Data."""
from __future__ import annotations

import argparse

from vis4mer.orchestrator.cli.args import add_storage_args, positive_int, storage_from_args
from vis4mer.orchestrator.files import one_line


def _trial(a, uri: str):
    from vis4mer.orchestrator.sweep.best import find_trial
    from vis4mer.orchestrator.train.config import ConfigError, check_name

    if (a.sweep is None) == (a.run is None):
        raise ConfigError("expected one of --sweep NAME (its best trial) or --run NAME")
    check_name(a.sweep or a.run, "--sweep" if a.sweep else "--run")
    return find_trial(uri, a.experiment, sweep=a.sweep, run=a.run, metric=a.metric)


def _evaluate(a) -> int:
    from vis4mer.orchestrator.sweep.evaluate import evaluate_trial
    from vis4mer.orchestrator.train.config import check_name
    from vis4mer.orchestrator.train.tracking import default_tracking_uri, reading_store

    check_name(a.split, "--split")
    uri = a.tracking_uri or default_tracking_uri()
    with reading_store(uri):
        trial = _trial(a, uri)
        print(f"evaluating {trial.run.info.run_name} ({a.checkpoint} checkpoint) on {a.split}", flush=True)
        metrics = evaluate_trial(trial, uri, a.split, a.checkpoint, a.address)
    for key, value in metrics.items():
        print(f"{key} {value:.6g}")
    return 0


def _promote(a) -> int:
    from vis4mer.orchestrator.sweep.registry import promote
    from vis4mer.orchestrator.train.tracking import default_tracking_uri, reading_store

    uri = a.tracking_uri or default_tracking_uri()
    with reading_store(uri):
        trial = _trial(a, uri)
        version, created = promote(trial, uri, a.model_name, a.alias, a.checkpoint)
    what = "registered" if created else "already registered as"
    print(f"{trial.run.info.run_name}: {what} {a.model_name} version {version}"
          + (f", alias {a.alias!r}" if a.alias else ""))
    print(f"model uri: models:/{a.model_name}@{a.alias}" if a.alias else f"model uri: models:/{a.model_name}/{version}")
    return 0


def _predict(a) -> int:
    from vis4mer.orchestrator.sweep.registry import predict
    from vis4mer.orchestrator.train.config import ConfigError
    from vis4mer.orchestrator.train.tracking import default_tracking_uri, reading_store

    if (a.data is None) == (a.videos is None):
        raise ConfigError("expected one of --data URI (a feature dataset) or --videos URI (raw videos)")
    if a.videos is not None and a.extractor is None:
        raise ConfigError("--videos: expected --extractor vit|swin")
    videos = None if a.videos is None else {"videos": a.videos, "extractor": a.extractor, "weights": a.weights,
                                            "arch": a.arch, "random_init": a.random_init}
    uri = a.tracking_uri or default_tracking_uri()
    with reading_store(uri):
        table = predict(a.model, uri, a.data, a.out, a.split, storage_from_args(a), a.address, videos,
                        a.batch_size)
    print(f"wrote {one_line(a.out)}: {table.num_rows} predictions")
    return 0


def _common(p, who: str) -> None:
    p.add_argument("--sweep", help=f"{who} the best trial of the latest sweep of this name")
    p.add_argument("--run", help=f"{who} this run (a trial's name is SWEEP-TRIALID)")
    p.add_argument("--checkpoint", choices=["best", "last"], default="best")
    p.add_argument("--metric", help="with --sweep: rank trials by this metric (default: the sweep's)")
    p.add_argument("--tracking-uri", help="default: sqlite:///$PWD/mlflow.db")
    p.add_argument("--experiment", help="MLflow experiment (default: search them all)")


def register(sub) -> None:
    e = sub.add_parser("evaluate", help="a trial's checkpoint on a split with the task's protocol (Ray Data); "
                                        "logs test_<metric> to its run and best_test_<metric> to its sweep")
    _common(e, "evaluate")
    e.add_argument("--split", default="test")
    e.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    e.set_defaults(func=_evaluate)

    p = sub.add_parser("promote", help="register a trial's model in the MLflow Model Registry (once per trial)")
    _common(p, "promote")
    p.add_argument("--model-name", required=True, help="registered model name")
    p.add_argument("--alias", help="point this alias (e.g. champion) at the version")
    p.set_defaults(func=_promote)

    r = sub.add_parser("predict", help="batch predictions of a registered model over a feature dataset or raw "
                                       "videos (Ray Data actor pool), written as one parquet file")
    r.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    r.add_argument("--data", help="feature dataset (folder or object-store prefix)")
    r.add_argument("--split", default="test", help="with --data")
    r.add_argument("--videos", help="instead of --data: folder or prefix of raw videos (encoded first)")
    r.add_argument("--extractor", choices=["vit", "swin"], help="with --videos: the encoder")
    r.add_argument("--weights", help="with --videos: the encoder's state-dict file; never downloaded")
    r.add_argument("--out", required=True, help="parquet file (local path or URI): video_id, prediction, scores")
    r.add_argument("--batch-size", type=positive_int, default=32, help="windows per forward pass")
    r.add_argument("--tracking-uri", help="default: sqlite:///$PWD/mlflow.db")
    r.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--arch", default="large", choices=["large", "tiny"], help=argparse.SUPPRESS)  # tiny: tests
    r.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # tests
    add_storage_args(r)
    r.set_defaults(func=_predict)
