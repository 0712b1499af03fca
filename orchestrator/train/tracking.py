"""MLflow on the driver: the run (explicit id, found again by name on resume), params, tags,
artifacts. Workers only log metrics into the run id they are given (worker.MlflowEpochLogger).

Embedded default: a sqlite store in the working directory (MLflow refuses plain `file:` stores).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from vis4mer.orchestrator.files import PROJECT_ROOT
from vis4mer.orchestrator.train.config import Config, ConfigError, config_yaml, flatten, to_dict


class Tag:
    """The MLflow tag names vis4mer writes and searches by."""
    RUN_NAME = "vis4mer.run_name"  # a run's stable name: a resumed run finds its MLflow run by it
    PARENT = "mlflow.parentRunId"  # MLflow's own: a sweep's trials under the sweep's parent run
    SWEEP_PARENT = "vis4mer.sweep_parent"  # on a sweep's parent run: the sweep's name
    SWEEP = "vis4mer.sweep"  # on a trial's run: its sweep's name
    TRIAL_ID = "vis4mer.trial_id"
    PARAMS = "vis4mer.params"  # a trial's sampled parameters, JSON
    METRIC = "vis4mer.metric"  # on a sweep's parent run: the metric that ranks its trials
    STOPPED_EARLY = "vis4mer.stopped_early"  # "true" when the scheduler ended the trial early
    ERROR = "vis4mer.error"  # the last line of a failed run's error
    DATASET = "vis4mer.dataset"
    MANIFEST_SHA256 = "vis4mer.dataset_manifest_sha256"
    TASK = "vis4mer.task"
    GIT_COMMIT = "vis4mer.git_commit"
    RAY_JOB_ID = "vis4mer.ray_job_id"
    STOP_REASON = "vis4mer.stop_reason"  # on a sweep's parent run: why it ended before every trial ran
    SOURCE_RUN = "vis4mer.source_run_id"  # on a registered model version: the run it was promoted from
    CHECKPOINT = "vis4mer.checkpoint"  # best | last
    CONFIG = "vis4mer.config"  # a model version's training config (YAML)


def default_tracking_uri() -> str:
    return f"sqlite:///{os.path.abspath('mlflow.db')}"


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.tracking_uri or default_tracking_uri()


TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SQLITE_MAGIC = b"SQLite format 3\x00"
HTTP_TIMEOUT_S = 10  # what one request to an MLflow server may take before vis4mer gives up on it


def shown_uri(uri: str) -> str:
    """A tracking URI fit for a message: any user name or password in it left out."""
    try:
        parts = urlsplit(uri)
        if parts.username is None and parts.password is None:
            return uri
        return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()
    except ValueError:
        return "(an unparsable URI)"


def check_tracking_uri(uri: str, reading: bool = False) -> None:
    """A tracking store MLflow can use, checked before any work: a known scheme, no credentials in the
    URI, and for sqlite a file that is an SQLite database (or, when not `reading`, none yet in an
    existing folder). Readers (`best`, `report`) need an existing MLflow store: they never create one."""
    where = f"tracking URI {shown_uri(uri)}"
    try:
        parts = urlsplit(uri)
        scheme, userinfo = parts.scheme.split("+")[0], parts.username is not None or parts.password is not None
    except ValueError:
        raise ConfigError(f"{where}: not a valid URI") from None
    if "://" not in uri or scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"{where}: expected sqlite:///PATH, http(s)://HOST[:PORT] or a database URI "
                          f"({', '.join(TRACKING_SCHEMES)})")
    if userinfo:
        raise ConfigError(f"{where}: has a user name or password in it: expected none (MLflow reads "
                          "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN)")
    if scheme in ("http", "https"):
        check_server_address(parts, where)
    elif scheme == "databricks":
        _check_databricks(uri, where)
    elif scheme != "sqlite":
        _check_database_driver(uri, where)
    if scheme != "sqlite":
        return
    try:
        _check_sqlite_file(uri, where, reading)
    except OSError as e:  # a name too long, a link loop
        raise ConfigError(f"{where}: cannot use it ({e.strerror or type(e).__name__})") from None


def check_server_address(parts, where: str) -> None:
    """An http(s) URI's host and port (1-65535) as a client will use them; a ConfigError naming `where`."""
    try:
        host, port = parts.hostname, parts.port  # the port is parsed on access
    except ValueError as e:
        raise ConfigError(f"{where}: not a valid URI ({e})") from None
    if not host or port == 0:
        raise ConfigError(f"{where}: expected http(s)://HOST[:PORT] with a port from 1 to 65535")


def _check_database_driver(uri: str, where: str) -> None:
    """A database store's SQLAlchemy dialect and driver are installed (MLflow imports them only when
    it first connects: on a Ray worker, after the sweep has started)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as e:
        raise ConfigError(f"{where}: needs the database driver {e.name!r}, which is not installed") from None
    except (SQLAlchemyError, ValueError) as e:
        raise ConfigError(f"{where}: not a database URI SQLAlchemy knows ({str(e).splitlines()[0][:120]})") from None


def _check_databricks(uri: str, where: str) -> None:
    """Databricks credentials for the URI's profile can be found (else MLflow fails on first use)."""
    import logging

    from mlflow.exceptions import MlflowException
    from mlflow.utils.databricks_utils import get_databricks_host_creds

    log = logging.getLogger("mlflow.utils.databricks_utils")
    level, log.level = log.level, logging.ERROR  # its fallback warning would be a second line
    try:
        get_databricks_host_creds(uri)
    except MlflowException:
        raise ConfigError(f"{where}: no Databricks credentials found for it (databricks-sdk's configuration "
                          "or DATABRICKS_HOST / DATABRICKS_TOKEN)") from None
    finally:
        log.setLevel(level)


def _check_sqlite_file(uri: str, where: str, reading: bool) -> None:
    path = Path(uri.split("://", 1)[1][1:])  # sqlite:///rel/path, sqlite:////abs/path
    if path.is_dir():
        raise ConfigError(f"{where}: {path} is a folder: expected an MLflow store file")
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(len(SQLITE_MAGIC))
        except OSError as e:
            raise ConfigError(f"{where}: cannot read {path} ({e.strerror})") from None
        if head != SQLITE_MAGIC and (reading or head):
            raise ConfigError(f"{where}: {path} is not an MLflow store (not an SQLite database)")
        why = _not_a_store(path) if reading else None
        if why:
            raise ConfigError(f"{where}: {path} is {why}: not an MLflow store this command can read")
    elif reading:
        raise ConfigError(f"--tracking-uri {shown_uri(uri)}: no MLflow store there (no such file {path})")
    elif not path.parent.is_dir():
        raise ConfigError(f"{where}: no such folder {path.parent}")
    if not reading:  # SQLite writes the file and a journal beside it
        for p in (path.parent, path) if path.exists() else (path.parent,):
            if not os.access(p, os.W_OK):
                raise ConfigError(f"{where}: {p} is not writable")


def _not_a_store(path: Path) -> str | None:
    """Why MLflow would have to change the SQLite file at `path` to open it (tables missing, another
    schema version: it would create or migrate them), or None. Readers refuse such a file, unchanged."""
    import mlflow.store.db.utils as db_utils  # imports every table's model into Base.metadata
    from mlflow.store.db.base_sql_model import Base

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            versions = [r[0] for r in db.execute("SELECT version_num FROM alembic_version")] \
                if "alembic_version" in tables else []
    except sqlite3.Error as e:
        return f"an SQLite database MLflow cannot read ({e})"
    if "experiments" not in tables or not versions:
        return "an SQLite database without MLflow's tables"
    head = db_utils._get_latest_schema_revision()
    if versions != [head]:  # alembic refuses a store with several heads, and would migrate an old one
        return (f"an MLflow store of schema {', '.join(map(repr, versions))}, this MLflow's is {head!r} (a copy "
                "can be migrated with `mlflow db upgrade`)")
    missing = sorted(set(Base.metadata.tables) - tables)
    if missing:
        return f"an SQLite database without MLflow's tables {', '.join(missing[:3])}"
    return None


@contextlib.contextmanager
def bounded_http(retries: int):
    """MLflow's HTTP client for the duration: `retries` retries of HTTP_TIMEOUT_S each (its default, 7
    retries doubling from 2 s, leaves a command silent for minutes when the server is down)."""
    knobs = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(HTTP_TIMEOUT_S)}
    saved = {k: os.environ.get(k) for k in knobs}
    os.environ.update(knobs)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def reading_store(uri: str):
    """For commands that only read MLflow: the store is checked first (never created), requests to a
    server give up after one try of 10 s, and an unreachable server is one line (a ConfigError)."""
    from mlflow.exceptions import MlflowException

    check_tracking_uri(uri, reading=True)
    with bounded_http(retries=0):
        try:
            yield
        except MlflowException as e:
            if not unreachable(e):
                raise
            raise ConfigError(f"MLflow at {shown_uri(uri)}: no answer (tried once, waited up to {HTTP_TIMEOUT_S} s): "
                              f"{str(e).splitlines()[0][-160:]}") from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=PROJECT_ROOT)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def manifest_hash(manifest_json: str) -> str:
    return hashlib.sha256(manifest_json.encode()).hexdigest()


def _experiment_id(client, cfg: Config, create: bool = True) -> str | None:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(cfg.tracking.experiment) if create else None


def latest_run(client, exp_ids: list[str], filter_string: str):
    """The most recently started run matching `filter_string` (a run or sweep started again has a
    newer one), or None."""
    found = client.search_runs(exp_ids, filter_string=filter_string, max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _find_run(client, exp_id: str | None, tag: str, value: str):
    """The run whose `tag` equals `value` (how a resumed run or sweep finds its own again), or None."""
    return None if exp_id is None else latest_run(client, [exp_id], f"tags.`{tag}` = '{value}'")


def get_or_create_run(cfg: Config, name: str, tags: dict, parent_run_id: str | None = None) -> str:
    """The MLflow run for this run name: the existing one (a resumed run logs into it) or a new one."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg)
    found = _find_run(client, exp_id, Tag.RUN_NAME, name)
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {Tag.RUN_NAME: name, **{k: str(v) for k, v in tags.items() if v is not None}}
    if parent_run_id:
        all_tags[Tag.PARENT] = parent_run_id
    run = client.create_run(exp_id, run_name=name, tags=all_tags)
    params = flatten(to_dict(cfg))  # secrets redacted by key name
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    client.log_text(run.info.run_id, config_yaml(cfg), "config.yaml")
    return run.info.run_id


FINISH_WAITS_S = (2, 4, 8, 16, 30)  # closing a run: about a minute for a tracking server that is down


def finish_run(cfg: Config, run_id: str, status: str = "FINISHED") -> bool:
    """Closes the run, retrying for about a minute while the server is unreachable; False (and a
    warning naming the run) when it could not, so a dead tracking server never fails a finished run."""
    import sys
    import time

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    for wait in (0, *FINISH_WAITS_S):
        time.sleep(wait)
        try:
            with bounded_http(retries=1):
                if status == "FAILED" and client.get_run(run_id).info.status != "RUNNING":
                    return True  # already closed, e.g. by the sweep when its scheduler stopped the trial
                client.set_terminated(run_id, status=status)
            return True
        except Exception as e:  # noqa: BLE001 - retried, then reported
            error = e
    print(f"warning: could not mark MLflow run {run_id} {status} at {shown_uri(tracking_uri(cfg))} "
          f"({type(error).__name__}); it stays RUNNING there", file=sys.stderr, flush=True)
    return False


def log_best_model(cfg: Config, run_id: str, model) -> None:
    """The best checkpoint as an MLflow PyTorch model (artifact `best_model`)."""
    import sys

    import mlflow
    import mlflow.pytorch
    from mlflow.exceptions import MlflowException

    reqs = pip_requirements()
    mlflow.set_tracking_uri(tracking_uri(cfg))
    try:
        with bounded_http(retries=1), mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(model, name="best_model", serialization_format="pickle", pip_requirements=reqs)
    except MlflowException as e:
        if not unreachable(e):
            raise
        print(f"warning: the best model was not logged to MLflow run {run_id} (server unreachable); it stays in "
              "the run's storage (<run>/best)", file=sys.stderr, flush=True)


def pip_requirements() -> list[str]:
    """What a logged vis4mer model needs: MLflow's PyTorch defaults and vis4mer. Stated, not inferred:
    inference loads the model in a subprocess to see what it imports (~4 s of CPU) and finds these."""
    from importlib.metadata import version

    import mlflow.pytorch

    return mlflow.pytorch.get_default_pip_requirements() + [f"vis4mer=={version('vis4mer')}"]


def unreachable(e: Exception) -> bool:
    """Whether an MlflowException says the server did not answer (rather than refused a request)."""
    return str(e).startswith("API request to")


def get_or_create_parent(cfg: Config, sweep: str, tags: dict, search_space: dict, resume: bool = False) -> str:
    """The sweep's parent run: a new one for each fresh run of the sweep (running it again starts a
    new sweep, as Tune does), found again by its sweep tag (the latest) when the sweep is resumed."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    exp_id = _experiment_id(client, cfg)
    found = _find_run(client, exp_id, Tag.SWEEP_PARENT, sweep) if resume else None
    if found:
        return found.info.run_id
    run = client.create_run(exp_id, run_name=sweep, tags={Tag.SWEEP_PARENT: sweep, **tags,
                                                          Tag.GIT_COMMIT: git_commit() or ""})
    client.log_text(run.info.run_id, json.dumps(search_space, indent=2), "search_space.json")
    client.log_text(run.info.run_id, config_yaml(cfg), "base_config.yaml")
    return run.info.run_id


def summarise_parent(cfg: Config, parent_id: str, grid, metric: str, mode: str, stop_reason: str | None = None) -> None:
    """Best config and a summary table (one row per trial) on the parent run; why it stopped early."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    rows = []
    for r in grid:
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id"), "config": r.config, metric: m.get(metric),
                     "epochs": m.get("training_iteration"), "error": str(r.error) if r.error else None})
    client.log_text(parent_id, json.dumps(rows, indent=2, default=str), "summary.json")
    try:
        best = grid.get_best_result(metric=metric, mode=mode)
        client.log_text(parent_id, json.dumps(best.config, indent=2, default=str), "best_config.json")
        if best.metrics and metric in best.metrics:
            client.log_metric(parent_id, f"best_{metric}", float(best.metrics[metric]))
    except RuntimeError:
        pass  # no trial reported the metric
    if stop_reason:
        client.set_tag(parent_id, Tag.STOP_REASON, stop_reason)
    client.set_terminated(parent_id, status="FINISHED")


def close_run_by_name(cfg: Config, name: str, status: str, tags: dict, error: str | None = None,
                      metrics: dict | None = None) -> str | None:
    """Ends the run called `name` (if it exists) with `status`, its tags and metrics and, for a failure,
    the error."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(cfg))
    found = _find_run(client, _experiment_id(client, cfg, create=False), Tag.RUN_NAME, name)
    if not found:
        return None
    run_id = found.info.run_id
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    for k, v in (metrics or {}).items():
        client.log_metric(run_id, k, v)
    if error:
        lines = [ln for ln in error.strip().splitlines() if ln.strip()]
        client.set_tag(run_id, Tag.ERROR, (lines[-1] if lines else error)[:500])
        client.log_text(run_id, error, "error.txt")
    client.set_terminated(run_id, status=status)
    return run_id
