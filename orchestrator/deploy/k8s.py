"""Kubernetes (KubeRay): a RayJob for a sweep, and validation against the KubeRay CRD schemas.

    spec = load_sweep("sweeps/lvu_genre.yaml")
    job = render_rayjob(spec, image="registry.example.com/vis4mer:0.1.0", workers=4, gpus_per_worker=1,
                        mlflow_uri="http://mlflow.mlflow.svc:5000",
                        overrides=["data.uri=s3://bucket/lvu/genre", "run.storage_path=s3://bucket/runs"])
    validate_manifest(job)          # ConfigError naming the path in the manifest, else None
    print(dump_yaml(job))

`render_rayjob` is a pure function of its arguments (and the sweep's base config): one RayJob whose
embedded RayCluster has a CPU-less head (it runs the sweep driver, no training) and one GPU worker
group that the autoscaler (v2) grows from 0 pods up to `workers` while trials wait for GPUs.

Sizing, from the sweep's base config (after the overrides):
  * a trial is one training run (train.config.run_resources: its Train workers with their CPUs and
    GPUs, plus DATA_CPUS for its Ray Data read tasks) and the Tune trial driver, which asks for a
    fraction of a CPU. The head has no CPUs, so all of it runs on the GPU pods;
  * a worker pod has `gpus_per_worker` GPUs and, unless given, `gpus_per_worker x
    (ceil(scaling.cpus_per_worker) + 1) + 1` CPUs: per GPU a Train worker and its data reads, and
    one CPU for the trial drivers;
  * the trainer checks that the GPUs of one trial are already in the cluster before asking for
    them (train/driver.py), and a cluster that scales from zero holds only the pod the
    trial driver started: so one pod must hold a whole trial (`scaling.num_workers <= gpus_per_worker`).

`validate_manifest` checks a RayJob or RayCluster as the API server would admit it: the CRD's
`openAPIV3Schema` (`spec.versions[name == "v1"]` of ../shared/kuberay-crds/ray.io_*.yaml, or
$VIS4MER_KUBERAY_CRDS) with unknown fields refused (kubectl's default strict field validation),
plus the checks KubeRay's operator makes before it creates anything (names, autoscaler v2
settings, TTL, backoff) and one of vis4mer's own: credentials only from Secrets.
"""
from __future__ import annotations

import copy
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from vis4mer.datasets.tasks import INT32_MAX
from vis4mer.orchestrator.deploy.names import check_image
from vis4mer.orchestrator.deploy.schema import json_path, schema_error
from vis4mer.orchestrator.files import PROJECT_ROOT, load_yaml_documents, parse_yaml
from vis4mer.orchestrator.secret_names import names_secret
from vis4mer.orchestrator.sweep.spec import SweepSpec, validate_sweep
from vis4mer.orchestrator.train.config import DATA_CPUS, Config, ConfigError, load_config, run_resources

CRDS_ENV = "VIS4MER_KUBERAY_CRDS"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
API_VERSION = "ray.io/v1"
RAY_VERSION = "2.60.0"  # the image's Ray (constraints.txt); KubeRay needs >= 2.52.0 for token auth
WORKDIR = "/home/ray/vis4mer"  # the project inside the image (Dockerfile WORKDIR)
CREDENTIALS = (  # env name, optional: the keys of the Secret (`kubectl create secret generic ...`)
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("MLFLOW_TRACKING_TOKEN", True),  # an MLflow server without auth needs none
)
MAX_NAME = {"RayJob": 47, "RayCluster": 53}  # KubeRay: 63 - len("-serve-svc"), minus 6 for a RayJob's cluster
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
DRIVER_CPUS = 1  # per pod, for the Tune trial drivers (each asks for a fraction of a CPU, never 0)
MAX_POD_GPUS = 64  # more GPUs than any node has: a typo, not a plan
MAX_POD_CPUS = 4096

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
                       r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
# The entrypoint is parsed by two shells (KubeRay's submitter script, then Ray's job supervisor),
# so override values keep to characters that mean nothing to a shell except as a glob that matches
# no file; single quotes protect them in the first shell.
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_.,:/=+\-@%\[\]]+$")


# ----------------------------------------------------------------------------------------------
# render


@dataclass
class Sizing:
    """What a worker pod holds and how many trials fit at full size (documented in the module)."""
    pod_cpus: int
    pod_gpus: int
    trial_cpus: float
    trial_gpus: int
    max_trials: int
    notes: list[str] = field(default_factory=list)


def plan_resources(spec: SweepSpec, cfg: Config, workers: int, gpus_per_worker: int,
                   cpus_per_worker: int | None = None) -> Sizing:
    sc, need = cfg.scaling, run_resources(cfg.scaling)
    if not 1 <= workers <= INT32_MAX:
        raise ConfigError(f"--workers={workers}: expected 1 to {INT32_MAX} (the most GPU pods the autoscaler may "
                          "start; Kubernetes counts replicas in int32)")
    if not 1 <= gpus_per_worker <= MAX_POD_GPUS:
        raise ConfigError(f"--gpus-per-worker={gpus_per_worker}: expected 1 to {MAX_POD_GPUS}")
    if cpus_per_worker is not None and not 1 <= cpus_per_worker <= MAX_POD_CPUS:
        raise ConfigError(f"--cpus-per-worker={cpus_per_worker}: expected 1 to {MAX_POD_CPUS}")
    per_worker_cpus = math.ceil(sc.cpus_per_worker)
    default = gpus_per_worker * (per_worker_cpus + DATA_CPUS) + DRIVER_CPUS
    pod_cpus = cpus_per_worker if cpus_per_worker is not None else default
    if pod_cpus < per_worker_cpus + DATA_CPUS:
        raise ConfigError(f"--cpus-per-worker={pod_cpus}: a Train worker needs scaling.cpus_per_worker="
                          f"{sc.cpus_per_worker:g} CPUs on one pod, plus {DATA_CPUS} for its trial's data reads")
    trial_gpus = need.gpus
    if trial_gpus > workers * gpus_per_worker:
        raise ConfigError(f"scaling.num_workers={sc.num_workers} GPU workers per trial but --workers {workers} x "
                          f"--gpus-per-worker {gpus_per_worker} GPUs in all: the trial could never start")
    trial_cpus = need.cpus
    fits = [int(workers * (pod_cpus - DRIVER_CPUS) // trial_cpus)]
    if trial_gpus:
        fits.append(workers * gpus_per_worker // trial_gpus)
    max_trials = min(fits)
    if max_trials < 1:
        raise ConfigError(f"a trial needs {trial_cpus:g} CPUs (scaling.num_workers x scaling.cpus_per_worker + "
                          f"{DATA_CPUS} for data reads) but {workers} pod(s) of {pod_cpus} CPUs hold fewer")
    notes = []
    if not sc.use_gpu:
        notes.append("the sweep's base config has scaling.use_gpu=false: its trials will not use the GPUs")
    if spec.budget.get("max_concurrent_trials") is None:
        notes.append(f"budget.max_concurrent_trials is null: the entrypoint passes --max-concurrent-trials "
                     f"{max_trials} (the trials that fit once every GPU pod is up)")
    return Sizing(pod_cpus, gpus_per_worker, trial_cpus, trial_gpus, max_trials, notes)


def k8s_name(sweep_name: str) -> str:
    """A RayJob name (DNS-1035 label, <= 47 characters) for a sweep: vis4mer-<sweep>, '_' -> '-'."""
    slug = re.sub(r"[^a-z0-9]+", "-", sweep_name.lower()).strip("-")
    return f"vis4mer-{slug}"[:MAX_NAME["RayJob"]].rstrip("-")


def _apply_overrides(spec: SweepSpec, overrides: list[str]) -> SweepSpec:
    spec = copy.deepcopy(spec)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value")
        if not _SAFE_ARG.fullmatch(o):
            raise ConfigError(f"override {o!r}: expected only letters, digits and _.,:/=+-@%[] (the entrypoint "
                              "goes through two shells); put other values in the sweep or training YAML")
        k, v = o.split("=", 1)
        spec.overrides[k] = parse_yaml(v, f"override {k}")
    validate_sweep(spec)
    return spec


def _in_image(path: str, workdir: str) -> str:
    p = Path(path).resolve()
    try:
        rel = p.relative_to(PROJECT_ROOT)
    except ValueError:
        raise ConfigError(f"{path}: outside the project ({PROJECT_ROOT}); the image holds only the project's files: "
                          "copy the sweep into sweeps/ and rebuild the image") from None
    return f"{workdir}/{rel.as_posix()}"


def _object_store(key: str, uri: str) -> None:
    if urlsplit(uri).scheme not in ("s3", "gs", "gcs"):
        raise ConfigError(f"{key}={uri!r}: expected an object-store URI (s3://, gs://) that every pod can reach; "
                          f"pass {key}=s3://... as an override")


def _check_mlflow_uri(uri: str, key: str = "--mlflow-uri") -> None:
    from vis4mer.orchestrator.train.tracking import check_server_address

    try:
        u = urlsplit(uri)
    except ValueError:
        raise ConfigError(f"{key}: not a valid URI") from None
    # never echoed: it may hold a secret
    if u.username or u.password or u.query or u.fragment or not _SAFE_ARG.fullmatch(uri):
        raise ConfigError(f"{key}: expected a plain http(s)://host[:port][/path], without credentials or "
                          "query: the token comes from the Secret (MLFLOW_TRACKING_TOKEN)")
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ConfigError(f"{key}={uri!r}: expected an http(s):// MLflow server that every pod can reach")
    check_server_address(u, key)


def _quantity(flag: str, value: str) -> str:
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
        raise ConfigError(f"{flag}={value!r}: expected a Kubernetes quantity such as 64Gi")
    number = re.match(r"[+-]?[0-9.]*", value).group()
    if value.startswith("-") or not any(c in "123456789" for c in number):
        raise ConfigError(f"{flag}={value!r}: expected a positive quantity such as 64Gi")
    return value


def _env(secret_name: str, mlflow_uri: str | None) -> list[dict]:
    env: list[dict] = [{"name": name, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": name,
                                                                      **({"optional": True} if optional else {})}}}
                       for name, optional in CREDENTIALS]
    if mlflow_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri})
    return env


def _shm() -> tuple[dict, dict]:
    return ({"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "dshm", "mountPath": "/dev/shm"})


def render_raycluster_spec(image: str, workers: int, gpus_per_worker: int, pod_cpus: int, memory: str,
                           secret_name: str, mlflow_uri: str | None, head_cpus: int = 4, head_memory: str = "16Gi",
                           idle_timeout_s: int = 300, workdir: str = WORKDIR) -> dict:
    """The RayCluster spec (also embedded in a RayJob): CPU-less head, one GPU group from 0 pods."""
    shm_volume, shm_mount = _shm()
    env = _env(secret_name, mlflow_uri)

    def container(name: str, cpus: int, mem: str, gpus: int = 0, ports: list | None = None) -> dict:
        res = {"cpu": str(cpus), "memory": mem, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
        c = {"name": name, "image": image, "imagePullPolicy": "IfNotPresent", "workingDir": workdir,
             "env": copy.deepcopy(env), "resources": {"requests": dict(res), "limits": dict(res)},
             "volumeMounts": [dict(shm_mount)]}
        if ports:
            c["ports"] = ports
        return c

    labels = {"app.kubernetes.io/name": "vis4mer"}
    return {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": idle_timeout_s},
        "headGroupSpec": {
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"metadata": {"labels": dict(labels)}, "spec": {
                "containers": [container("ray-head", head_cpus, head_memory, ports=[
                    {"containerPort": 6379, "name": "gcs-server"},
                    {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 10001, "name": "client"}])],
                "volumes": [dict(shm_volume)]}},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": workers,
            "rayStartParams": {},
            "template": {"metadata": {"labels": dict(labels)}, "spec": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [container("ray-worker", pod_cpus, memory, gpus=gpus_per_worker)],
                "volumes": [dict(shm_volume)]}},
        }],
    }


def render_rayjob(spec: SweepSpec, image: str, workers: int, gpus_per_worker: int, cpus_per_worker: int | None = None,
                  memory: str = "64Gi", secret_name: str = "vis4mer-credentials", mlflow_uri: str | None = None,
                  namespace: str = "default", overrides: list[str] | None = None, name: str | None = None,
                  ttl_seconds: int = 600, pre_running_deadline_s: int = 1800, head_cpus: int = 4,
                  head_memory: str = "16Gi", idle_timeout_s: int = 300, workdir: str = WORKDIR,
                  resume: bool = False) -> dict:
    """A RayJob that runs `vis4mer sweep <sweep> [overrides]` on a fresh autoscaling GPU cluster.

    `spec` is the sweep as loaded from its file (load_sweep without overrides); `overrides` (key=value,
    as for `vis4mer sweep`) are checked against every trial's config and passed on in the entrypoint.
    Raises ConfigError for anything the cluster could not run (local data or run paths, no reachable
    MLflow, a trial larger than a pod, a malformed image, name or quantity). `resume`: the job
    continues the interrupted sweep (`vis4mer sweep --resume`) from run.storage_path instead.
    """
    return render(spec, image, workers, gpus_per_worker, cpus_per_worker, memory, secret_name, mlflow_uri, namespace,
                  overrides, name, ttl_seconds, pre_running_deadline_s, head_cpus, head_memory, idle_timeout_s,
                  workdir, resume)[0]


def render(spec: SweepSpec, image: str, workers: int, gpus_per_worker: int, cpus_per_worker: int | None = None,
           memory: str = "64Gi", secret_name: str = "vis4mer-credentials", mlflow_uri: str | None = None,
           namespace: str = "default", overrides: list[str] | None = None, name: str | None = None,
           ttl_seconds: int = 600, pre_running_deadline_s: int = 1800, head_cpus: int = 4,
           head_memory: str = "16Gi", idle_timeout_s: int = 300, workdir: str = WORKDIR,
           resume: bool = False) -> tuple[dict, Sizing]:
    """render_rayjob, plus the Sizing (pod size, trials at once, notes for the user)."""
    overrides = list(overrides or [])
    if not spec.path:
        raise ConfigError(f"sweep {spec.name!r}: no file; render a sweep loaded from sweeps/*.yaml")
    check_image("--image", image)
    if not _DNS1123_LABEL.fullmatch(namespace or "") or len(namespace) > 63:
        raise ConfigError(f"--namespace={namespace!r}: expected a DNS-1123 label (lower-case letters, digits, '-')")
    if not _DNS1123_SUBDOMAIN.fullmatch(secret_name or "") or len(secret_name) > 253:
        raise ConfigError(f"--secret={secret_name!r}: expected a Secret name (lower-case letters, digits, '-', '.')")
    _quantity("--memory", memory)
    _quantity("--head-memory", head_memory)
    if not 0 <= ttl_seconds <= INT32_MAX:
        raise ConfigError(f"--ttl-seconds={ttl_seconds}: expected 0 to {INT32_MAX}")
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("tracking.tracking_uri=")]
    if mlflow_uri:
        _check_mlflow_uri(mlflow_uri)
        if given and given[-1] != mlflow_uri:
            raise ConfigError("tracking.tracking_uri and --mlflow-uri disagree: give the MLflow URI once")
        if not given:
            overrides.append(f"tracking.tracking_uri={mlflow_uri}")
    eff = _apply_overrides(spec, overrides)
    cfg = load_config(eff.base, eff.base_overrides())
    _object_store("data.uri", cfg.data.uri)
    _object_store("run.storage_path", cfg.run.storage_path)
    if cfg.tracking.enabled:
        uri = cfg.tracking.tracking_uri
        if not uri:
            raise ConfigError("tracking.enabled=true but no MLflow server: pass --mlflow-uri http://... (a pod's "
                              "sqlite store is lost with the cluster), or tracking.enabled=false")
        _check_mlflow_uri(uri, "tracking.tracking_uri")
        mlflow_uri = uri
    sizing = plan_resources(eff, cfg, workers, gpus_per_worker, cpus_per_worker)
    sweep_file = _in_image(spec.path, workdir)
    command = ["--resume", "--resume-file", sweep_file, spec.name] if resume else [sweep_file]
    # The cluster starts with no GPU pod, so Tune's automatic concurrency would see none: say how many fit.
    if spec.budget.get("max_concurrent_trials") is None:  # (options first: positionals follow)
        command = ["--max-concurrent-trials", str(sizing.max_trials), *command]
    entrypoint = shlex.join(["vis4mer", "sweep", *command, *overrides])
    job_name = name or k8s_name(spec.name)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": {"name": job_name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "vis4mer", "app.kubernetes.io/component": "sweep",
                                "vis4mer/sweep": k8s_name(spec.name).removeprefix("vis4mer-")}},
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "submitterConfig": {"backoffLimit": 0},
            "backoffLimit": 0,
            "preRunningDeadlineSeconds": pre_running_deadline_s,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds,
            "rayClusterSpec": render_raycluster_spec(image, workers, gpus_per_worker, sizing.pod_cpus, memory,
                                                     secret_name, mlflow_uri, head_cpus, head_memory,
                                                     idle_timeout_s, workdir),
        },
    }, sizing


# ----------------------------------------------------------------------------------------------
# validate


def crds_dir() -> Path:
    return Path(os.environ.get(CRDS_ENV) or PROJECT_ROOT.parent / "shared" / "kuberay-crds")


def _strict(schema: Any) -> Any:
    """Unknown fields refused, as kubectl's strict field validation does (the CRD only prunes them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _int_formats():
    """The CRDs' `format: int32|int64` (replicas, TTLs, deadlines), which the API server enforces and
    jsonschema only checks when told."""
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())
    for name, bits in (("int32", 32), ("int64", 64)):
        checker.checks(name)(lambda v, bits=bits: not isinstance(v, int) or -(2 ** (bits - 1)) <= v < 2 ** (bits - 1))
    return checker


_INT_FORMATS = _int_formats()


@lru_cache(maxsize=4)
def _validator(kind: str, folder: str):
    path = Path(folder) / CRD_FILES[kind]
    try:
        # a vendored schema, not user input: read with PyYAML's C loader (the CRDs are large)
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load(path.read_text(), Loader=loader)  # noqa: S506
    except FileNotFoundError:
        raise ConfigError(f"KubeRay CRD {path} not found: set {CRDS_ENV} to the folder holding "
                          f"{', '.join(CRD_FILES.values())}") from None
    versions = [v for v in (crd.get("spec") or {}).get("versions", []) if v.get("name") == "v1"]
    if not versions:
        raise ConfigError(f"{path}: no version v1 in the CRD")
    return _go_pattern_validator()(_strict(versions[0]["schema"]["openAPIV3Schema"]), format_checker=_INT_FORMATS)


def _go_pattern(validator, pattern: str, instance, schema):
    """`pattern` as the API server checks it (Go's regexp, where `$` ends the text): Python's `$` also
    matches before a final newline, so "64Gi\n" would pass here and be refused by kubectl apply."""
    from jsonschema.exceptions import ValidationError

    if not validator.is_type(instance, "string"):
        return
    go = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern
    if re.search(go, instance) is None:
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _go_pattern_validator():
    from jsonschema import Draft7Validator
    from jsonschema.validators import extend

    return extend(Draft7Validator, {"pattern": _go_pattern})



def validate_manifest(obj: Any, where: str = "manifest") -> None:
    """Raises ConfigError('<where>: <path in the manifest>: <what was expected>') or returns None."""
    def fail(path: str, msg: str) -> None:
        raise ConfigError(f"{where}: {path}: {msg}")

    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a mapping (a RayJob or RayCluster), got {type(obj).__name__}")
    if obj.get("apiVersion") != API_VERSION:
        fail("apiVersion", f"expected {API_VERSION!r}, got {obj.get('apiVersion')!r}")
    kind = obj.get("kind")
    if kind not in CRD_FILES:
        fail("kind", f"expected one of {sorted(CRD_FILES)}, got {kind!r}")
    validator = _validator(kind, str(crds_dir().resolve()))
    from jsonschema.exceptions import best_match

    err = best_match(validator.iter_errors(obj))
    if err is not None:
        patterns = {_QUANTITY.pattern: "a Kubernetes quantity (e.g. 64Gi, 8, 500m)"}
        raise ConfigError(f"{where}: {schema_error(err, patterns, 'KubeRay CRD')}")
    meta = obj.get("metadata") or {}
    if not isinstance(meta, dict):
        fail("metadata", "expected a mapping")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        fail("metadata.name", "required field missing")
    if len(name) > MAX_NAME[kind] or not _DNS1035.fullmatch(name):
        fail("metadata.name", f"{name!r}: expected a DNS-1035 label (a lower-case letter, then lower-case letters, "
                              "digits, '-') "
                              f"of at most {MAX_NAME[kind]} characters (KubeRay's limit for a {kind})")
    ns = meta.get("namespace")
    if ns is not None and (not isinstance(ns, str) or not _DNS1123_LABEL.fullmatch(ns) or len(ns) > 63):
        fail("metadata.namespace", f"{ns!r}: expected a DNS-1123 label")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        fail("spec", "required field missing")
    if kind == "RayJob":
        _check_rayjob(spec, fail)
        if spec.get("rayClusterSpec") is not None:
            _check_cluster(spec["rayClusterSpec"], "spec.rayClusterSpec", fail)
    else:
        _check_cluster(spec, "spec", fail)
    _check_credentials(obj, fail)


def _check_rayjob(spec: dict, fail) -> None:
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        fail("spec.submissionMode", f"{mode!r} is not one of {list(SUBMISSION_MODES)}")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        fail("spec.rayClusterSpec", "required field missing (or spec.clusterSelector for an existing cluster)")
    if spec.get("clusterSelector") and not spec["clusterSelector"].get("ray.io/cluster"):
        fail("spec.clusterSelector", "expected the key ray.io/cluster naming the cluster")
    if not spec.get("entrypoint") and mode != "InteractiveMode":
        fail("spec.entrypoint", "required field missing")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0:
        fail("spec.ttlSecondsAfterFinished", f"{ttl}: expected >= 0")
    if ttl > 0 and not spec.get("shutdownAfterJobFinishes"):
        fail("spec.ttlSecondsAfterFinished", "needs spec.shutdownAfterJobFinishes: true (KubeRay refuses a TTL "
                                             "without it)")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        fail("spec.suspend", "needs spec.shutdownAfterJobFinishes: true")
    for key in ("backoffLimit",):
        if spec.get(key) is not None and spec[key] < 0:
            fail(f"spec.{key}", f"{spec[key]}: expected >= 0")
    sub = (spec.get("submitterConfig") or {}).get("backoffLimit")
    if sub is not None and sub < 0:
        fail("spec.submitterConfig.backoffLimit", f"{sub}: expected >= 0")
    if mode == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        fail("spec.backoffLimit", "expected 0 in InteractiveMode")
    if mode == "SidecarMode" and (spec.get("submitterConfig") or spec.get("submitterPodTemplate")):
        fail("spec.submitterConfig", "not supported in SidecarMode")
    ads = spec.get("activeDeadlineSeconds")
    if ads is not None and ads <= 0:
        fail("spec.activeDeadlineSeconds", f"{ads}: expected > 0")
    prd = spec.get("preRunningDeadlineSeconds")
    if prd is not None and prd <= 0:
        fail("spec.preRunningDeadlineSeconds", f"{prd}: expected > 0")


def _env_of(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def _check_cluster(spec: dict, at: str, fail) -> None:
    head = spec.get("headGroupSpec") or {}
    groups = [(f"{at}.headGroupSpec", "head", head)] + [
        (f"{at}.workerGroupSpecs[{i}]", g.get("groupName"), g)
        for i, g in enumerate(spec.get("workerGroupSpecs") or [])]
    names = set()
    for path, gname, g in groups:
        if not ((g.get("template") or {}).get("spec") or {}).get("containers"):
            fail(f"{path}.template.spec.containers", "expected at least one container")
        rsp = g.get("rayStartParams") or {}
        if g.get("resources") and any(rsp.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            fail(f"{path}.resources", "resources set both here and in rayStartParams; KubeRay takes only one")
        if "labels" in rsp:
            fail(f"{path}.rayStartParams.labels", f"not supported; use {path}.labels")
        if gname != "head":
            if gname in names:
                fail(f"{path}.groupName", f"{gname!r} used twice")
            names.add(gname)
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", INT32_MAX)
            for key in ("replicas", "minReplicas", "maxReplicas"):
                if isinstance(g.get(key), int) and not 0 <= g[key] <= INT32_MAX:
                    fail(f"{path}.{key}", f"{g[key]}: expected 0 to {INT32_MAX} (int32)")
            if lo > hi:
                fail(f"{path}.minReplicas", f"{lo} > maxReplicas {hi}")
            if g.get("replicas") is not None and not lo <= g["replicas"] <= hi:
                fail(f"{path}.replicas", f"{g['replicas']}: expected within [minReplicas {lo}, maxReplicas {hi}]")
    head_env = _env_of(head["template"]["spec"]["containers"][0])
    env_v2 = head_env.get("RAY_enable_autoscaler_v2", {}).get("value") in ("1", "true")
    opts = spec.get("autoscalerOptions") or {}
    env_at = f"{at}.headGroupSpec.template.spec.containers[0].env"
    if not spec.get("enableInTreeAutoscaling"):
        if env_v2:
            fail(env_at, "RAY_enable_autoscaler_v2 is set but enableInTreeAutoscaling is not true")
    else:
        if "version" in opts and "RAY_enable_autoscaler_v2" in head_env:
            fail(env_at, "RAY_enable_autoscaler_v2 set together with autoscalerOptions.version; KubeRay refuses "
                         "both: keep only autoscalerOptions.version")
        if opts.get("version") == "v2" or env_v2:
            for path, _, g in groups:
                rp = g["template"]["spec"].get("restartPolicy")
                if rp not in (None, "", "Never"):
                    fail(f"{path}.template.spec.restartPolicy", f"{rp!r}: expected Never or unset with autoscaler v2")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        v = spec.get("rayVersion")
        if not v:
            fail(f"{at}.rayVersion", "required with authOptions.mode token (Ray >= 2.52.0)")
        nums = tuple(int(x) for x in re.findall(r"\d+", str(v))[:3])
        if nums < (2, 52, 0):
            fail(f"{at}.rayVersion", f"{v!r}: authOptions.mode token needs Ray >= 2.52.0")


def _check_credentials(obj: dict, fail) -> None:
    """vis4mer's rule: an env var that names a secret comes from a Secret, never a literal value."""
    def walk(node: Any, parts: list) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, parts + [k])
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if parts[-1:] == ["env"] and isinstance(v, dict) and isinstance(v.get("name"), str) \
                        and v.get("value") is not None and names_secret(v["name"]):
                    fail(json_path(parts + [i, "value"]), f"{v['name']} has a literal value: take it from a Secret "
                                                      "(valueFrom.secretKeyRef)")
                walk(v, parts + [i])

    walk(obj, [])


def load_manifests(path: str) -> list[Any]:
    """The YAML documents of a file (empty documents skipped)."""
    return load_yaml_documents(path, "manifest file")
