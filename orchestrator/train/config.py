"""Typed run configuration: omegaconf structured configs, YAML files, `key=value` overrides.

    cfg = load_config("sweeps/train_synthetic.yaml", ["optim.lr=3e-3", "scaling.num_workers=2"])

Everything is validated here, before any Ray or cluster work: an unknown key, a wrong type or an
impossible value raises ConfigError (one line naming the key and what was expected); the CLI turns
it into exit code 2. The resolved config is saved with every run (checkpoints, MLflow).

Two sections are other modules' dataclasses, not copies: `model` is vis4mer.model's ViS4merConfig
without the fields the dataset decides (`model_config` adds them from the task), and every storage
section is vis4mer.datasets' StorageOptions.
"""
from __future__ import annotations

import functools
import math
import os
import re
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vis4mer.datasets.errors import UserError
from vis4mer.datasets.storage import StorageOptions
from vis4mer.datasets.tasks import TaskSpec
from vis4mer.model.config import ViS4merConfig
from vis4mer.orchestrator.files import dump_yaml, parse_yaml, read_text
from vis4mer.orchestrator.secret_names import names_secret


class ConfigError(UserError):
    """A bad config: names the key and what was expected."""


# The model section: ViS4merConfig's own fields and defaults, minus what the dataset's task decides.
FROM_TASK = ("d_input", "l_max", "task", "num_classes")
_hints = typing.get_type_hints(ViS4merConfig)
ModelCfg = make_dataclass("ModelCfg", [(f.name, _hints[f.name], field(default=f.default)) for f in fields(ViS4merConfig)
                                       if f.name not in FROM_TASK])
ModelCfg.__doc__ = "vis4mer.model.ViS4merConfig without d_input, l_max and the head (the dataset's task sets them)."
ModelCfg.__module__ = __name__  # pickled by reference (Tune ships configs to trials)
_LONGEST = 2**62  # a length no pooling schedule empties: config checks that hold for any dataset


def model_config(model, task: TaskSpec) -> ViS4merConfig:
    """The model for a dataset's task: the config's model section plus the task's sizes and head."""
    return ViS4merConfig(**asdict(model), d_input=task.feature_dim, l_max=task.seq_len, task=task.type,
                         num_classes=max(task.num_classes, 2))


@dataclass
class DataCfg:
    uri: str = MISSING  # dataset folder or object-store prefix (datasets/format.py)
    storage: StorageOptions = field(default_factory=StorageOptions)
    batch_size: int = 16  # global: split evenly over the workers
    eval_batch_size: int = 32  # windows per evaluation batch, per worker
    shuffle_files: bool = True
    shuffle_buffer: int | None = None  # rows; local shuffle on each worker
    # none: read storage every epoch; memory: materialise the split in Ray's object store once (data
    # that fits in memory); disk: each node keeps the shards it reads in cache_dir (datasets/cache.py)
    cache: str = "none"
    cache_dir: str = "/tmp/vis4mer-shards"  # node-local; the same path on every node
    cache_max_gb: float = 500.0
    eval_splits: list[str] = field(default_factory=lambda: ["val"])


@dataclass
class OptimCfg:
    lr: float = 1e-3
    weight_decay: float = 0.01
    ssm_lr: float = 1e-3  # the SSM parameters' own lr (weight decay 0), as released
    grad_accum: int = 1
    clip_norm: float | None = None


@dataclass
class ScheduleCfg:
    kind: str = "plateau"  # plateau | cosine | constant
    factor: float = 0.2  # plateau
    patience: int = 1  # plateau, in scheduler steps
    interval: int = 10  # plateau: epochs between steps (LVU: 10, Breakfast/COIN: 1)
    warmup_epochs: int = 0  # cosine
    min_lr: float = 0.0  # cosine


@dataclass
class TrainCfg:
    epochs: int = 100
    seed: int = 1112
    eval_every: int = 1
    checkpoint_every: int = 1
    keep_last: int = 2
    bf16: bool = True  # autocast on GPU only
    # torch.compile the training step's model: on a GPU the step is bound by memory traffic (norms,
    # GELU, dropout, transposes) that compilation fuses; the first steps pay the compile time
    compile: bool = False
    max_failures: int = 0
    fail_at_epoch: int | None = None  # fault injection for reliability tests: raise when this epoch starts


@dataclass
class ScalingCfg:
    num_workers: int = 1
    local_mode: bool = False  # Ray Train's local mode: the training function runs in the driver process
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"


@dataclass
class RunCfg:
    name: str | None = None  # stable name: a restarted run resumes; default from the config's hash
    storage_path: str = "./results"  # local path or s3://, gs://
    storage: StorageOptions = field(default_factory=StorageOptions)


@dataclass
class TrackingCfg:
    enabled: bool = True
    tracking_uri: str | None = None  # default: sqlite:///<cwd>/mlflow.db
    experiment: str = "vis4mer"


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    run: RunCfg = field(default_factory=RunCfg)
    tracking: TrackingCfg = field(default_factory=TrackingCfg)


# What one training run asks of the cluster. Every place that sizes runs (the sweep's concurrency,
# KubeRay pods, cloud nodes) counts this way.
DATA_CPUS = 1  # Ray Data's read tasks: never left waiting for CPUs the Train workers hold (they would hang)


@dataclass(frozen=True)
class RunResources:
    workers: int  # Train workers (local mode: the driver process, which trains itself)
    cpus_per_worker: float
    gpus_per_worker: int  # 0 or 1

    @property
    def cpus(self) -> float:
        return self.workers * self.cpus_per_worker + DATA_CPUS

    @property
    def gpus(self) -> int:
        return self.workers * self.gpus_per_worker


def run_resources(scaling: ScalingCfg) -> RunResources:
    workers = 1 if scaling.local_mode else scaling.num_workers
    return RunResources(workers, scaling.cpus_per_worker, 1 if scaling.use_gpu else 0)


# Names that become folders, MLflow filter values and Tune state (runs, sweeps): no path separators,
# quotes, spaces or newlines, and never '.' or '..'.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
INT_LIMIT = 2**63  # what torch, numpy and MLflow take as an integer
INTERPOLATION = "${"


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value):
        raise ConfigError(f"{what} {value!r:.80}: expected a name of letters, digits, '.', '_' and '-' that starts "
                          "with a letter or digit, at most 100 characters")
    return value


def _no_interpolation(node: Any, key: str) -> None:
    """Configs take values as written: an omegaconf interpolation (`${oc.env:...}`, `${other.key}`) could
    copy an environment variable (a credential) into MLflow params, artifacts, errors and job
    manifests. Refused wherever a config is read (YAML files, sweeps, overrides); the value itself is
    never shown."""
    if isinstance(node, dict):
        for k, v in node.items():
            _no_interpolation(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _no_interpolation(v, f"{key}[{i}]")
    elif isinstance(node, str) and INTERPOLATION in node:
        raise ConfigError(f"{key or 'config'}: an interpolation ('${{...}}'): expected a plain value (configs "
                          "resolve nothing; credentials come from the environment by name, never through a config)")


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    if "not in struct" in str(e) or "Key '" in msg and "not" in msg:
        return f"unknown key {key!r}" if key else msg
    if key:
        return f"{key}: {msg}"
    return msg


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    # built once: OmegaConf.structured is ~40% of a load_config, and a sweep validates every trial's
    # config before Ray starts (OmegaConf.merge copies it, so the cached one is never changed)
    return OmegaConf.structured(Config)


@functools.lru_cache(maxsize=32)
def _with_file(path: str, mtime_ns: int) -> DictConfig:
    """The defaults with one YAML file merged in, cached per file version (the key: `load_config`
    has read the file's mtime); the callers merge onto it, which copies it."""
    loaded = parse_yaml(read_text(path, "config file"), path)
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections")
    try:
        _no_interpolation(loaded, "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return _merge(_schema(), loaded, where=path)


def _merge(base: DictConfig, other, where: str) -> DictConfig:
    """OmegaConf.merge, its errors (a wrong type, a list where a section belongs) as ConfigErrors."""
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:  # it names the key, when it knows it
        raise ConfigError(_one_line(e) if getattr(e, "full_key", None) else f"{where}: {_one_line(e)}") from None
    except (TypeError, ValueError) as e:  # omegaconf's own, for containers of the wrong kind
        raise ConfigError(f"{where}: {str(e).splitlines()[0]} (a list or value where a section belongs?)") from None


def _overrides(merged: DictConfig, overrides: list[str]) -> DictConfig:
    """`key=value` overrides merged onto `merged`; an error names its override."""
    parsed = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o.split(INTERPOLATION)[0]!r:.80}: expected key=value")
        key, value = o.split("=", 1)
        _no_interpolation(value, key)
        try:
            parsed.append((key, OmegaConf.from_dotlist([o])))
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key!r:.80}: the value is not valid YAML "
                              f"({getattr(e, 'problem', None) or str(e).splitlines()[0]})") from None
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {key!r:.80}: {_one_line(e)}") from None
    if not parsed:
        return merged
    try:
        return OmegaConf.merge(merged, *(p for _, p in parsed))  # one merge: each copies the whole config
    except Exception:  # noqa: BLE001 - merged again one at a time, so that the error names its override
        for key, p in parsed:
            merged = _merge(merged, p, where=f"override {key!r:.80}")
        raise  # not reached: one of the merges above raises


def _finish(merged: DictConfig) -> Config:
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"{missing[0]}: required, no value given")
    try:
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    validate(cfg)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML (optional) + dotlist overrides onto the structured defaults; typed and validated."""
    if path is None:
        merged = _schema()
    else:
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:  # missing, under a file, a name too long, a link loop: read_text names which
            read_text(path, "config file")
            raise
        merged = _with_file(str(path), mtime)
    return _finish(_overrides(merged, list(overrides or [])))


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """`cfg` with `key=value` overrides applied, typed and validated (a sweep's trials: the base config
    is loaded once, each trial's parameters are applied to it)."""
    return _finish(_overrides(_merge(_schema(), to_dict(cfg), where="config"), overrides))


def validate(cfg: Config) -> None:
    """Impossible values (what types alone cannot say)."""
    def need(cond: bool, key: str, expected: str, value: Any) -> None:
        if not cond:
            raise ConfigError(f"{key}={value!r}: expected {expected}")

    _check_values(asdict(cfg), "")
    o, s, t, sc, d = cfg.optim, cfg.schedule, cfg.train, cfg.scaling, cfg.data
    need(o.lr > 0, "optim.lr", "> 0", o.lr)
    need(o.ssm_lr > 0, "optim.ssm_lr", "> 0", o.ssm_lr)
    need(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    need(o.grad_accum >= 1, "optim.grad_accum", ">= 1", o.grad_accum)
    need(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", "> 0 or null", o.clip_norm)
    need(s.kind in ("plateau", "cosine", "constant"), "schedule.kind", "plateau, cosine or constant", s.kind)
    need(0 < s.factor < 1, "schedule.factor", "in (0, 1)", s.factor)
    need(s.interval >= 1, "schedule.interval", ">= 1", s.interval)
    need(s.patience >= 0, "schedule.patience", ">= 0", s.patience)
    need(s.min_lr >= 0, "schedule.min_lr", ">= 0", s.min_lr)
    need(s.warmup_epochs >= 0, "schedule.warmup_epochs", ">= 0", s.warmup_epochs)
    if s.kind == "cosine":
        need(0 <= s.warmup_epochs < max(t.epochs, 1), "schedule.warmup_epochs", f"in [0, train.epochs={t.epochs})",
             s.warmup_epochs)
    need(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    need(t.eval_every >= 1, "train.eval_every", ">= 1", t.eval_every)
    need(t.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", t.checkpoint_every)
    need(t.keep_last >= 1, "train.keep_last", ">= 1", t.keep_last)
    need(t.max_failures >= -1, "train.max_failures", ">= -1 (-1: retry forever)", t.max_failures)
    need(0 <= t.seed < INT_LIMIT, "train.seed", "in [0, 2^63)", t.seed)
    need(t.fail_at_epoch is None or t.fail_at_epoch >= 0, "train.fail_at_epoch", ">= 0 or null", t.fail_at_epoch)
    need(sc.num_workers >= 1, "scaling.num_workers", ">= 1 (scaling.local_mode=true runs in the driver)",
         sc.num_workers)
    need(not (sc.local_mode and (sc.num_workers > 1 or sc.use_gpu)), "scaling.local_mode",
         "false with several workers or GPUs (local mode is one process)", sc.local_mode)
    need(sc.cpus_per_worker > 0, "scaling.cpus_per_worker", "> 0", sc.cpus_per_worker)
    need(sc.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "scaling.placement_strategy",
         "PACK, SPREAD, STRICT_PACK or STRICT_SPREAD", sc.placement_strategy)
    per_step = sc.num_workers * o.grad_accum
    need(d.batch_size >= per_step and d.batch_size % per_step == 0, "data.batch_size",
         f"a positive multiple of scaling.num_workers x optim.grad_accum = {per_step}", d.batch_size)
    need(d.eval_batch_size >= 1, "data.eval_batch_size", ">= 1", d.eval_batch_size)
    need(d.shuffle_buffer is None or d.shuffle_buffer >= 1, "data.shuffle_buffer", ">= 1 row or null",
         d.shuffle_buffer)
    need(d.cache in ("none", "memory", "disk"), "data.cache", "none, memory or disk", d.cache)
    need(d.cache_max_gb > 0, "data.cache_max_gb", "> 0", d.cache_max_gb)
    need(os.path.isabs(d.cache_dir), "data.cache_dir", "an absolute, node-local path", d.cache_dir)
    for split in d.eval_splits:
        need(split in ("val", "test"), "data.eval_splits", "a list of val and/or test", d.eval_splits)
    try:  # the model's own checks, at a length no schedule empties (the dataset's length comes later)
        ViS4merConfig(**asdict(cfg.model), l_max=_LONGEST).validate(prefix="model.")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.run.name is not None:
        check_name(cfg.run.name, "run.name")


def _check_values(node: Any, key: str) -> None:
    """What no field may hold: a non-finite number, an integer past 64 bits, a URI with credentials."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_values(v, f"{key}.{k}" if key else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_values(v, f"{key}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}={node}: expected a finite number")
    elif isinstance(node, int) and not isinstance(node, bool) and not -INT_LIMIT < node < INT_LIMIT:
        raise ConfigError(f"{key}: an integer of {node.bit_length()} bits: expected one that fits in 64 bits")
    elif isinstance(node, str) and "://" in node:
        try:
            parts = urlsplit(node)
            userinfo = parts.username is not None or parts.password is not None
        except ValueError:
            raise ConfigError(f"{key}: not a valid URI") from None
        if userinfo:  # the value is not shown: it holds a credential
            raise ConfigError(f"{key}: a URI with a user name or password in it: expected none (credentials come "
                              "from the environment, a profile or the platform's identity)")


def config_yaml(cfg: Config) -> str:
    return dump_yaml(to_dict(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def from_dict(d: dict) -> Config:
    return OmegaConf.to_object(OmegaConf.merge(_schema(), d))


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; values whose key names a secret are redacted."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = "***" if names_secret(k) and v is not None else v
    return out
