"""After the sweep: `vis4mer promote` (the winner into the MLflow Model Registry) and `vis4mer predict`
(a registered model over a feature dataset, or over raw videos, on Ray Data).

    version, created = promote(find_trial(uri, None, sweep="demo"), uri, "vis4mer-demo", alias="champion")
    table = predict("models:/vis4mer-demo@champion", uri, "data/synthetic_order", split="test", out="p.parquet")

A promoted version is a PyTorch model with a signature and an input example of the task's shape,
tagged with its training config, the dataset manifest's sha256, its sweep and trial and its test
metrics; promoting the same trial's checkpoint again adds no version (it is found by its tags).
"""
from __future__ import annotations

import io
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vis4mer.orchestrator.files import check_file_target, write_atomic
from vis4mer.orchestrator.sweep.best import Trial
from vis4mer.orchestrator.train.config import ConfigError, check_name, config_yaml
from vis4mer.orchestrator.train.tracking import Tag

MODEL_ARTIFACT = "registered_model"
PREDICTION_COLUMNS = ("video_id", "prediction", "scores")


def _versions(client, model_name: str) -> list:
    from mlflow.exceptions import MlflowException

    try:
        return client.search_model_versions(f"name='{model_name}'")
    except MlflowException:
        return []


def promote(trial: Trial, tracking_uri: str, model_name: str, alias: str | None = None,
            checkpoint: str = "best") -> tuple[str, bool]:
    """Registers the trial's checkpoint as a version of `model_name` (once: the same trial and
    checkpoint again returns the existing version) and points `alias` at it. Returns (version, created)."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from vis4mer.datasets.format import open_dataset
    from vis4mer.orchestrator.train.driver import load_model
    from vis4mer.orchestrator.train.tracking import pip_requirements

    check_name(model_name, "--model-name")
    if alias is not None:
        check_name(alias, "--alias")
    client = MlflowClient(tracking_uri)
    run = client.get_run(trial.run.info.run_id)  # with what `evaluate` logged since
    same = [v for v in _versions(client, model_name) if v.tags.get(Tag.SOURCE_RUN) == run.info.run_id
            and v.tags.get(Tag.CHECKPOINT) == checkpoint]
    created = not same
    if same:
        version = same[0].version
    else:
        ds = open_dataset(trial.cfg.data.uri, trial.cfg.data.storage)
        model = load_model(trial.cfg, checkpoint, ds)
        import torch

        example = np.random.default_rng(0).standard_normal((1, ds.task.seq_len, ds.task.feature_dim)).astype(np.float32)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        mlflow.set_tracking_uri(tracking_uri)
        with mlflow.start_run(run_id=run.info.run_id):
            info = mlflow.pytorch.log_model(model, name=MODEL_ARTIFACT, signature=infer_signature(example, output),
                                            input_example=example, registered_model_name=model_name,
                                            serialization_format="pickle", pip_requirements=pip_requirements())
        version = str(info.registered_model_version)
        tags = {Tag.SOURCE_RUN: run.info.run_id, Tag.CHECKPOINT: checkpoint, Tag.CONFIG: config_yaml(trial.cfg),
                Tag.MANIFEST_SHA256: run.data.tags.get(Tag.MANIFEST_SHA256, ""),
                Tag.SWEEP: run.data.tags.get(Tag.SWEEP, ""), Tag.TRIAL_ID: run.data.tags.get(Tag.TRIAL_ID, ""),
                Tag.TASK: ds.task.name,
                **{f"vis4mer.{k}": str(v) for k, v in run.data.metrics.items() if k.startswith("test_")}}
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
    if alias is not None:
        client.set_registered_model_alias(model_name, alias, version)
    return version, created


def load_registered(model_uri: str, tracking_uri: str):
    """The ViS4mer behind `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/ID/PATH` in the MLflow
    at `tracking_uri` (also its registry); a ConfigError when there is none there."""
    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    from vis4mer.model import ViS4mer

    if not model_uri.startswith(("models:/", "runs:/")):
        raise ConfigError(f"--model {model_uri!r:.120}: expected models:/NAME@ALIAS, models:/NAME/VERSION or "
                          "runs:/RUN_ID/PATH")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except (MlflowException, OSError) as e:
        raise ConfigError(f"--model {model_uri}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(model, ViS4mer):
        raise ConfigError(f"--model {model_uri}: a {type(model).__name__}, expected a vis4mer ViS4mer")
    return model.eval()


def check_fits(model, task, where: str) -> None:
    """The model was built for this data: its input dim, sequence length and head match the task."""
    c = model.cfg
    for what, got, want in (("feature dim", task.feature_dim, c.d_input), ("sequence length", task.seq_len, c.l_max),
                            ("task type", task.type, c.task)):
        if got != want:
            raise ConfigError(f"{where}: {what} {got}, but the model expects {want}")
    if task.type == "classification" and task.num_classes > c.num_classes:
        raise ConfigError(f"{where}: {task.num_classes} classes, but the model has {c.num_classes} outputs")


def predict(model_uri: str, tracking_uri: str, data_uri: str | None, out: str, split: str = "test", storage=None,
            address: str | None = None, videos: dict | None = None, batch_size: int = 32) -> pa.Table:
    """Predictions of a registered model for every video of `split` of the dataset at `data_uri` (or,
    with `videos`, of a folder of raw videos: {"videos", "extractor", "weights", ...} for the encoder
    stage first), written to `out` as parquet (video_id, prediction, scores) all at once."""
    from vis4mer.datasets.format import open_dataset
    from vis4mer.datasets.storage import filesystems
    from vis4mer.orchestrator.train.driver import init_ray
    from vis4mer.orchestrator.train.inference import predict_split

    target = filesystems(out, storage)
    if target.scheme == "file":
        check_file_target(target.path)  # before any work
    model = load_registered(model_uri, tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        if videos is not None:
            data_uri, split = _encode(videos, model, f"{tmp}/features", address), "train"
        ds = open_dataset(data_uri, storage)
        check_fits(model, ds.task, data_uri)  # before any work
        ds.require_split(split, f"--split {split}")
        init_ray(address, log_to_driver=False)
        table = predict_split(model, ds, split, batch_size=batch_size).select(list(PREDICTION_COLUMNS))
    _write_parquet(table, target, out)
    return table


def _encode(videos: dict, model, folder: str, address: str | None) -> str:
    """The encoder stage into a temporary dataset whose shape the model takes (checked first)."""
    from vis4mer.datasets.encoders import EncoderSpec
    from vis4mer.datasets.extract import DEFAULT_TASK, ExtractConfig, extract
    from vis4mer.datasets.tasks import get_task
    from vis4mer.orchestrator.train.driver import init_ray

    spec = EncoderSpec(extractor=videos["extractor"], preprocess=videos.get("preprocess") or (
        "released" if videos["extractor"] == "vit" else "model"), arch=videos.get("arch", "large"))
    spec.validate()
    task = get_task(DEFAULT_TASK[spec.extractor], feature_dim=spec.dim)  # the encoder's tokens and windows
    check_fits(model, task, f"--videos with --extractor {spec.extractor}")
    extract(ExtractConfig(videos=videos["videos"], out=folder, spec=spec, weights=videos.get("weights"),
                          random_init=videos.get("random_init", False), task=task.name),
            log=lambda line: None, start_ray=lambda: init_ray(address, log_to_driver=False))
    return folder


def _write_parquet(table: pa.Table, target, out: str) -> None:
    """All or nothing: the file is written in one step (a rename locally, one PUT on an object store)."""
    from vis4mer.datasets.storage import StorageError, describe_error

    buf = io.BytesIO()
    pq.write_table(table, buf)
    if target.scheme == "file":
        write_atomic(target.path, buf.getvalue())
        return
    try:
        with target.pa.open_output_stream(target.path) as f:
            f.write(buf.getvalue())
    except OSError as e:
        raise StorageError(describe_error(out, e)) from None
