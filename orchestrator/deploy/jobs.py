"""Ray job submission: run a sweep or a training config on a Ray cluster through the Jobs SDK.

    vis4mer submit sweeps/lvu_genre.yaml data.uri=s3://... --address http://HEAD:8265 --env AWS_ACCESS_KEY_ID ...

The job's runtime env carries vis4mer's code as a wheel in `py_modules` (built on the fly from the
installed packages, deploy/wheel.py: the cluster's image needs Ray, torch and the other
dependencies, not vis4mer), the project folder as its `working_dir` (the sweep and config files,
without the code folders, .git, .venv, data, MLflow stores, checkpoints and reports), optional pip
requirements, and environment variables. Credentials travel by *name*: `--env NAME` copies NAME's
value from the submitter's environment into the runtime env, so it never appears in the job's
entrypoint, in the logs or in MLflow (configs hold no secrets: see vis4mer.orchestrator.train.config.flatten).
Ray keeps a job's runtime env in its job table, readable by whoever reaches the dashboard: on
shared clusters prefer the cluster's own identity (KubeRay Secrets, instance profiles).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from vis4mer.orchestrator.deploy.wheel import build_wheel
from vis4mer.orchestrator.files import PROJECT_ROOT
from vis4mer.orchestrator.secret_names import holds_secret, names_secret, redact
from vis4mer.orchestrator.train.config import ConfigError

EXCLUDES = [".git", ".venv", "venv", "data", "mlruns", "mlflow.db", "mlflow.db-*", "results", "reports",
            "checkpoints", "artifacts", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "*.pt",
            "*.ckpt", "*.parquet", "best.yaml"]
# From the project itself: its code travels as the wheel, and a top-level `model/` or `datasets/` in
# the job's working directory would shadow other packages of those names there (Hugging Face's).
PROJECT_EXCLUDES = ["/model", "/datasets", "/orchestrator", "/tests", "/benchmarks", "/build"]
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def upload_limit_bytes() -> int:
    """Ray's limit on a working_dir package (the GCS's largest gRPC message)."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return int(GCS_STORAGE_MAX_SIZE)


def _excluded(rel: str, patterns: list[str]) -> bool:
    """Ray's (gitignore) reading of `excludes`: '/name' is anchored at the working dir, other patterns
    match any path component."""
    parts = rel.split("/")
    return any(fnmatch.fnmatch(parts[0], pat[1:]) if pat.startswith("/") else
               any(fnmatch.fnmatch(p, pat) for p in parts) for pat in patterns)


def excludes_for(wd: Path) -> list[str]:
    return EXCLUDES + (PROJECT_EXCLUDES if wd.resolve() == PROJECT_ROOT else [])


def working_dir_size(root: Path, patterns: list[str] | None = None) -> tuple[int, list[tuple[int, str]]]:
    """Bytes that would be uploaded (files not excluded) and the largest few files."""
    patterns = excludes_for(root) if patterns is None else patterns
    total, files = 0, []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not _excluded(os.path.normpath(os.path.join(rel_dir, d)), patterns)]
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            if _excluded(rel, patterns):
                continue
            try:
                size = os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                continue
            total += size
            files.append((size, rel))
    return total, sorted(files, reverse=True)[:3]


@dataclass
class Submission:
    entrypoint: str
    runtime_env: dict
    metadata: dict
    submission_id: str | None = None


def build_submission(config_path: str, overrides: list[str], package_dir: str | Path,
                     working_dir: str | None = None, env_names: list[str] | None = None,
                     pip: list[str] | None = None, submission_id: str | None = None,
                     max_concurrent_trials: int | None = None) -> Submission:
    """Checks what is asked (the YAML, the overrides, the env names, the upload size) and builds the
    job, with vis4mer's wheel written into `package_dir` (it must outlive the submission); nothing is
    sent. A sweep YAML (it has `search_space`) runs `vis4mer sweep`, any other YAML `vis4mer train`."""
    from vis4mer.orchestrator.files import load_yaml
    from vis4mer.orchestrator.sweep.spec import load_sweep
    from vis4mer.orchestrator.train.config import load_config

    wd = Path(working_dir or PROJECT_ROOT).resolve()
    if not wd.is_dir():
        raise ConfigError(f"--working-dir {wd}: no such folder")
    cfg_file = Path(config_path).resolve()
    if not cfg_file.is_file():
        raise ConfigError(f"{config_path}: no such file (expected a sweep or training YAML)")
    try:
        rel = cfg_file.relative_to(wd)
    except ValueError:
        raise ConfigError(f"{config_path}: outside the working dir {wd}, which is what the cluster receives; "
                          "put it under the project or pass --working-dir") from None
    raw = load_yaml(cfg_file, "sweep or training YAML")
    for o in overrides:
        if names_secret(o.split("=", 1)[0]):
            raise ConfigError(f"override {redact(o.split('=', 1)[0])!r}: credentials never go on the command line; "
                              "pass them with --env NAME")
    for req in pip or []:
        if holds_secret(req):
            raise ConfigError(f"--pip {redact(req)!r}: a credential in a requirement reaches the cluster's job record; "
                              "use a package index that reads its credentials from the environment")
    if submission_id is not None and not _SUBMISSION_ID.fullmatch(submission_id):
        raise ConfigError(f"--submission-id {submission_id!r:.80}: expected 1-128 letters, digits, '.', '_' or '-'")
    kind = "sweep" if isinstance(raw, dict) and "search_space" in raw else "train"
    # validate here, before anything leaves this machine: the job would fail the same way later
    if kind == "sweep":
        load_sweep(str(cfg_file), overrides)
    else:
        load_config(str(cfg_file), overrides)
    for o in overrides:  # a secret variable's value under another name: `ray job list` shows the command line
        if holds_secret(o):
            raise ConfigError(f"override {redact(o.split('=', 1)[0])!r}: its value holds a credential (a secret "
                              "environment variable's value); credentials never go on the command line: "
                              "pass them with --env NAME")
    env = {}
    for name in env_names or []:
        if not _ENV_NAME.fullmatch(name):
            shown = name.split("=", 1)[0] + ("=<hidden>" if "=" in name else "")  # never echo a value
            raise ConfigError(f"--env {shown!r}: expected an environment variable name (its value is taken "
                              "from this environment, never given on the command line)")
        if name not in os.environ:
            raise ConfigError(f"--env {name}: not set in this environment")
        env[name] = os.environ[name]

    excludes = excludes_for(wd)
    size, largest = working_dir_size(wd, excludes)
    limit = upload_limit_bytes()
    if size > limit:
        top = ", ".join(f"{p} ({s / 2**20:.0f} MiB)" for s, p in largest)
        raise ConfigError(f"--working-dir {wd}: {size / 2**20:.0f} MiB to upload, above Ray's limit of "
                          f"{limit / 2**20:.0f} MiB (largest: {top}); move data to object storage or exclude it")
    runtime_env: dict = {"working_dir": str(wd), "excludes": excludes, "py_modules": [str(build_wheel(package_dir))]}
    if env:
        runtime_env["env_vars"] = env
    if pip:
        runtime_env["pip"] = list(pip)
    flags = []
    if max_concurrent_trials:
        if kind != "sweep":
            raise ConfigError(f"--max-concurrent-trials: {config_path} is a training config, not a sweep")
        flags = ["--max-concurrent-trials", str(max_concurrent_trials)]
    words = ["python", "-m", "vis4mer.orchestrator.cli", kind, *flags, rel.as_posix(), *overrides]
    return Submission(entrypoint=shlex.join(words), runtime_env=runtime_env,
                      metadata={"vis4mer.kind": kind, "vis4mer.config": rel.as_posix()},
                      submission_id=submission_id)


def redacted_runtime_env(runtime_env: dict | None) -> dict:
    """A runtime env fit to print: env var values hidden."""
    out = dict(runtime_env or {})
    if out.get("env_vars"):
        out["env_vars"] = {k: "***" for k in out["env_vars"]}
    return out


def client(address: str | None):
    import warnings

    from ray.exceptions import RpcError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD
    if "://" not in address:  # the dashboard's HOST:PORT (Ray would take it for a GCS address and wait 40 s)
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address}: expected the Ray dashboard's http(s)://HOST:PORT "
                          "(e.g. http://127.0.0.1:8265)")
    try:
        with warnings.catch_warnings():  # Ray warns before it fails; the error below is the one line
            warnings.simplefilter("ignore")
            return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, RpcError) as e:
        raise ConfigError(f"--address {address}: no Ray dashboard answers there ({str(e).splitlines()[0][:200]})") \
            from None


AGENT_WAIT_S = 120  # a cluster that has just started may not have its job agent up yet


def submit(sub: Submission, address: str | None) -> str:
    """Submits; while the head's job agent is still starting ("No available agent"), waits and retries."""
    import time

    c = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    delay = 1.0
    while True:
        try:
            return c.submit_job(entrypoint=sub.entrypoint, runtime_env=sub.runtime_env, metadata=sub.metadata,
                                submission_id=sub.submission_id)
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
