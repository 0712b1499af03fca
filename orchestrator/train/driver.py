"""The training driver: config -> checks -> Ray Data + TorchTrainer -> MLflow.

    outcome = run_training(load_config("train.yaml", ["optim.lr=3e-3"]))

Checks everything it can before starting any Ray work (config, dataset manifest, model schedule
against the dataset's sequence length). The run has a stable name (`run.name`, or one derived from
the config), so running the same config again resumes from its last checkpoint (Ray Train V2
resumes by name and storage path) and logs into the same MLflow run.

The per-worker function is `vis4mer.orchestrator.train.worker.train_loop_per_worker`; this module
is the driver side of the Ray seam.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from vis4mer.datasets.format import FeatureDataset, open_dataset
from vis4mer.datasets.storage import check_local_target, filesystems
from vis4mer.orchestrator.train.config import Config, ConfigError, model_config, to_dict
from vis4mer.orchestrator.train.worker import STATE, train_loop_per_worker


@dataclass
class TrainOutcome:
    name: str
    run_id: str | None
    metrics: dict
    checkpoint_path: str | None
    best_uri: str | None
    result: object = None  # ray.train.Result: per-checkpoint metrics in result.best_checkpoints


def run_name(cfg: Config) -> str:
    if cfg.run.name:
        return cfg.run.name
    d = to_dict(cfg)
    d["run"].pop("name", None)
    return "train-" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def prepare(cfg: Config, ds: FeatureDataset | None = None) -> FeatureDataset:
    """The checks that need the dataset but no Ray (its splits, the model's schedule at the task's
    length, the batch size against the training videos); returns the opened dataset. `ds`: the
    config's dataset, already opened (a sweep opens it once for all its trials)."""
    from vis4mer.orchestrator.train.tracking import check_tracking_uri, tracking_uri

    if cfg.tracking.enabled:
        check_tracking_uri(tracking_uri(cfg))
    runs = filesystems(cfg.run.storage_path, cfg.run.storage)
    if runs.scheme == "file":  # checkpoints and results go there: a folder that can be made and written
        check_local_target(runs.path, f"run.storage_path {cfg.run.storage_path}")
    ds = ds or open_dataset(cfg.data.uri, cfg.data.storage)
    for split in ["train", *cfg.data.eval_splits]:
        ds.require_split(split, "data.eval_splits")
    try:
        model_config(cfg.model, ds.task).validate(prefix="model.")
    except ValueError as e:
        raise ConfigError(f"{e} (sequence length {ds.task.seq_len} from {cfg.data.uri})") from None
    rows = ds.manifest.split_rows()["train"]
    workers = cfg.scaling.num_workers
    if rows // workers < cfg.data.batch_size // workers:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: larger than the {rows} training videos "
                          f"can fill on {workers} worker(s)")
    return ds


def init_ray(address: str | None = None, log_to_driver: bool = True) -> bool:
    """Joins `address` (or RAY_ADDRESS), or starts a local Ray; True when it started a local one.

    Sweeps pass log_to_driver=False: their driver prints one progress line per change, and the
    trials' worker logs stay in Ray's session logs (errors reach the summary and MLflow)."""
    import ray
    from ray.data import DataContext

    started_local = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            # more logical CPUs than cores: Train workers must not starve Ray Data's read tasks
            ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), log_to_driver=log_to_driver)
            started_local = True
    ctx = DataContext.get_current()  # progress is ours to show: one line per epoch
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return started_local


def check_gpus(cfg: Config, started_local: bool) -> None:
    """Refuses GPU workers that cannot come: a local Ray (started here, or every node on loopback)
    has all the GPUs it will ever have. A real cluster may still be scaling GPU nodes up from 0
    (KubeRay, `ray up`): there Ray Train waits for them."""
    import ray

    if not cfg.scaling.use_gpu:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    loopback = ("127.0.0.1", "localhost")
    local = started_local or all(n["NodeManagerAddress"] in loopback for n in ray.nodes() if n["Alive"])
    if local and gpus < cfg.scaling.num_workers:
        raise ConfigError(f"scaling.use_gpu=true with {cfg.scaling.num_workers} worker(s): the cluster has "
                          f"{int(gpus)} GPU(s)")


def run_training(cfg: Config, address: str | None = None, callbacks: list | None = None,
                 parent_run_id: str | None = None, extra_tags: dict | None = None,
                 ds: FeatureDataset | None = None) -> TrainOutcome:
    """One training run on Ray Train. `ds`: the config's dataset, already opened (a sweep's trials
    get it from the sweep, which opened it once)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from vis4mer.datasets.cache import ShardCache
    from vis4mer.datasets.pipeline import read_split
    from vis4mer.datasets.reader import ShardReader
    from vis4mer.orchestrator.train import tracking
    from vis4mer.orchestrator.train.tracking import Tag

    ds = prepare(cfg, ds)
    name = run_name(cfg)
    run_res = filesystems(cfg.run.storage_path, cfg.run.storage)
    best_uri = run_res.uri(name, "best")

    check_gpus(cfg, init_ray(address))

    run_id = None
    if cfg.tracking.enabled:
        tags = {Tag.DATASET: cfg.data.uri, Tag.MANIFEST_SHA256: tracking.manifest_hash(ds.manifest.to_json()),
                Tag.GIT_COMMIT: tracking.git_commit(), Tag.RAY_JOB_ID: ray.get_runtime_context().get_job_id(),
                Tag.TASK: ds.task.name, **(extra_tags or {})}
        run_id = tracking.get_or_create_run(cfg, name, tags, parent_run_id)

    # Format 2: Ray Data moves index rows, each worker reads its videos (ShardReader: local disk, the
    # node's cache, or a range request). data.cache=memory keeps the features in Ray's object store.
    cache = (ShardCache(cfg.data.cache_dir, int(cfg.data.cache_max_gb * 2**30)) if cfg.data.cache == "disk"
             else None)
    index = cfg.data.cache != "memory" and ds.manifest.format_version >= 2
    datasets = {"train": read_split(ds, "train", shuffle_files=cfg.data.shuffle_files, seed=cfg.train.seed,
                                    cache=cache, index=index)}
    for split in cfg.data.eval_splits:
        datasets[split] = read_split(ds, split, cache=cache, index=index)
    if cfg.data.cache == "memory":  # read once; later epochs stream from the object store (windows still vary)
        datasets = {k: v.materialize() for k, v in datasets.items()}
    worker_cfg = {
        "cfg": to_dict(cfg), "task": ds.task.to_dict(), "run_id": run_id,
        "tracking_uri": tracking.tracking_uri(cfg), "best_uri": best_uri,
        "reader": ShardReader(ds, cache) if index else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=0 if cfg.scaling.local_mode else cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=None if cfg.scaling.local_mode else {"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=run_res.path,
            storage_filesystem=None if run_res.scheme == "file" else run_res.pa,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_last),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or None),
        datasets=datasets,
    )
    try:
        result = trainer.fit()
    except BaseException:
        if run_id:
            tracking.finish_run(cfg, run_id, "FAILED")
        raise
    metrics = dict(result.metrics or {})
    if run_id:
        best = load_best_model(cfg, best_uri, ds)
        if best is not None:
            tracking.log_best_model(cfg, run_id, best)
        tracking.finish_run(cfg, run_id)
    ckpt = result.checkpoint.path if result.checkpoint else None
    return TrainOutcome(name, run_id, metrics, ckpt, best_uri, result)


def load_best_model(cfg: Config, best_uri: str, ds: FeatureDataset | None = None):
    """The model of the best checkpoint (weights only), or None when there is none yet."""
    return _load_model(cfg, filesystems(best_uri, cfg.run.storage), ds)


def load_model(cfg: Config, checkpoint: str = "best", ds: FeatureDataset | None = None):
    """A finished run's model from its storage: the best checkpoint (`<run>/best`) or the last one
    Ray Train kept (`<run>/checkpoint_*`, the latest). A ConfigError when there is none."""
    runs = filesystems(cfg.run.storage_path, cfg.run.storage)
    name = run_name(cfg)
    if checkpoint == "best":
        where = runs.uri(name, "best")
        model = _load_model(cfg, filesystems(where, cfg.run.storage), ds)
    else:
        import pyarrow.fs as pafs

        try:
            infos = runs.pa.get_file_info(pafs.FileSelector(runs.join(name), allow_not_found=True))
        except OSError:
            infos = []
        last = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                      and i.base_name.startswith("checkpoint_"))
        where = runs.uri(name, last[-1]) if last else runs.uri(name, "checkpoint_*")
        model = _load_model(cfg, filesystems(where, cfg.run.storage), ds) if last else None
    if model is None:
        raise ConfigError(f"run {name}: no {checkpoint} checkpoint at {where}")
    return model


def _load_model(cfg: Config, res, ds: FeatureDataset | None):
    import io
    import warnings

    import torch

    from vis4mer.model import ViS4mer

    try:
        with res.pa.open_input_file(res.join(STATE)) as f:
            data = f.read()
    except (FileNotFoundError, OSError):
        return None
    where = res.uri(STATE)
    try:  # a file torch cannot read, or weights of another model: the checkpoint's fault, named
        with warnings.catch_warnings():  # torch warns about what it then refuses: the error is the one line
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ValueError...
        raise ConfigError(f"{where}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ConfigError(f"{where}: expected a vis4mer checkpoint (a dict with the model's state_dict under 'model')")
    ds = ds or open_dataset(cfg.data.uri, cfg.data.storage)
    model = ViS4mer(model_config(cfg.model, ds.task))
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: weights that do not fit the run's model ({str(e).splitlines()[0][:160]})") \
            from None
    return model.eval()
