"""Cloud GPU clusters for sweeps with Ray's cluster launcher (`ray up`): render and validate configs.

    cfg = render_cluster("aws", load_sweep("sweeps/lvu_genre.yaml"), gpu_type="a100", spot=True)
    validate_cluster_config(cfg)         # Ray's own ray-schema.json and config checks, then ours

A rendered cluster has a CPU-only head that runs no training (its node type advertises
`resources: {CPU: 0}`, so Ray schedules no trial there; it is always on demand) and one GPU worker
type with `min_workers: 0` that autoscales up to `max_workers` (sized from the sweep, or
`--workers`), on demand or spot / preemptible. Nodes reach object storage through the cloud's own
identity (an AWS instance profile, a GCP service account), never through keys in the file; the
validator refuses key material and a head that could take GPU work.

Validation is what `ray up` does before it calls the cloud: `ray-schema.json` from the installed
ray package, then `prepare_config` (merge with the provider's defaults) and `validate_config`. The
resource auto-detection `ray up` does in between needs cloud credentials and is skipped: every
node type here states its resources.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from vis4mer.datasets.tasks import INT32_MAX
from vis4mer.orchestrator.deploy.names import check_gcp_project, check_image
from vis4mer.orchestrator.deploy.schema import json_path, schema_error
from vis4mer.orchestrator.files import dump_yaml, load_yaml
from vis4mer.orchestrator.secret_names import names_secret
from vis4mer.orchestrator.train.config import ConfigError, run_resources

PROVIDERS = ("aws", "gcp")
HEAD = "head"
GPU_WORKER = "gpu_worker"
SPOT_WORKER = "gpu_worker_spot"
DEFAULT_WORKERS = 2  # max_workers without a sweep or --workers

# GPU type -> an 8-GPU (T4: 4-GPU) instance per provider: (instance/machine type, accelerator, GPUs, vCPUs)
AWS_GPUS: dict[str, tuple[str, str, int, int]] = {
    "a100": ("p4d.24xlarge", "A100-40GB", 8, 96),
    "a100-80gb": ("p4de.24xlarge", "A100-80GB", 8, 96),
    "h100": ("p5.48xlarge", "H100-80GB", 8, 192),
    "a10g": ("g5.48xlarge", "A10G-24GB", 8, 192),
    "l4": ("g6.48xlarge", "L4-24GB", 8, 192),
    "t4": ("g4dn.12xlarge", "T4-16GB", 4, 48),
}
GCP_GPUS: dict[str, tuple[str, str, int, int]] = {
    "a100": ("a2-highgpu-8g", "nvidia-tesla-a100", 8, 96),
    "a100-80gb": ("a2-ultragpu-8g", "nvidia-a100-80gb", 8, 96),
    "h100": ("a3-highgpu-8g", "nvidia-h100-80gb", 8, 208),
    "l4": ("g2-standard-96", "nvidia-l4", 8, 96),
    "t4": ("n1-standard-48", "nvidia-tesla-t4", 4, 48),
}
GPU_TABLES = {"aws": AWS_GPUS, "gcp": GCP_GPUS}
GPU_TYPES = tuple(sorted(set(AWS_GPUS) | set(GCP_GPUS)))

HEAD_MACHINE = {"aws": "m5.4xlarge", "gcp": "n2-standard-16"}  # 16 vCPU, 64 GB: GCS, dashboard, Tune driver
DEFAULT_REGION = {"aws": "us-west-2", "gcp": "us-central1"}
PLACEHOLDERS = ("ACCOUNT_ID", "PROJECT_ID")  # left in a rendered config when no identity/project is given
GCP_IMAGE = "projects/deeplearning-platform-release/global/images/family/common-cu121"
GCP_STORAGE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
GCP_CLOUD_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
REMOTE_DIR = "~/vis4mer"  # the repository, synced by file_mounts and pip-installed on every node

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,30}[a-z0-9])?$")
_PLAIN = re.compile(r"[A-Za-z0-9:/_.@=,+-]{1,512}")  # identities and machine images: nothing a shell reads


def ray_version() -> str:
    return importlib.metadata.version("ray")


def default_image() -> str:
    """Ray's GPU image of the Ray version this project pins (the cluster must match the client)."""
    return f"rayproject/ray:{ray_version()}-py311-gpu"


def schema_path() -> str:
    """The ray-schema.json `ray up` validates against (inside the installed ray package)."""
    import ray.autoscaler

    return os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")


# ----------------------------------------------------------------------------------- sizing


@dataclass
class SweepNeeds:
    """What one sweep asks of a cluster (the per-trial figure is the largest over its grid)."""
    sweep: str
    trials: int  # grid points x num_samples
    concurrent: int  # trials that can run at once (budget.max_concurrent_trials caps it)
    gpus_per_trial: int  # Train workers x 1 GPU (0 for a CPU sweep)
    cpus_per_trial: float  # one training run's CPUs (train.config.run_resources: workers and data reads)
    train_workers: int


def sweep_needs(spec) -> SweepNeeds:
    """Reads the sweep's trial configs (no Ray): how many trials, and the resources of each."""
    from vis4mer.orchestrator.sweep.spec import discrete_overrides
    from vis4mer.orchestrator.train.config import load_config

    grid = 1
    for dist in spec.search_space.values():
        kind, arg = next(iter(dist.items()))
        if kind == "grid":
            grid *= len(arg)
    trials = grid * spec.budget["num_samples"]
    mct = spec.budget.get("max_concurrent_trials")
    gpus, cpus, workers = 0, 1.0, 1
    seen = set()
    for combo in discrete_overrides(spec):
        # only scaling.* decides a trial's resources: load one full combo per distinct scaling choice
        key = tuple(o for o in combo if o.startswith("scaling."))
        if key in seen:
            continue
        seen.add(key)
        need = run_resources(load_config(spec.base, spec.base_overrides(combo)).scaling)
        gpus = max(gpus, need.gpus)
        cpus = max(cpus, need.cpus)
        workers = max(workers, need.workers)
    return SweepNeeds(spec.name, trials, min(trials, mct) if mct else trials, gpus, cpus, workers)


def trials_per_node(needs: SweepNeeds, node_gpus: int, node_cpus: int) -> int:
    by_gpu = node_gpus // needs.gpus_per_trial if needs.gpus_per_trial else math.inf
    return int(min(by_gpu, node_cpus // needs.cpus_per_trial))


def nodes_for(needs: SweepNeeds, node_gpus: int, node_cpus: int) -> int:
    """GPU nodes to run every concurrent trial at once."""
    per_node = trials_per_node(needs, node_gpus, node_cpus)
    if per_node >= 1:
        return math.ceil(needs.concurrent / per_node)
    per_trial = max(math.ceil(needs.gpus_per_trial / node_gpus), math.ceil(needs.cpus_per_trial / node_cpus))
    return needs.concurrent * per_trial


# ---------------------------------------------------------------------------------- render


def _cluster_name(name: str | None, sweep) -> str:
    if name is None:
        base = f"vis4mer-{sweep.name}" if sweep is not None else "vis4mer"
        name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-")[:32].rstrip("-")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"cluster_name {name!r}: expected lowercase letters, digits and '-', starting with "
                          "a letter, at most 32 characters (GCP instance names)")
    return name


def _region_zone(provider: str, region: str | None) -> tuple[str, str]:
    region = region or DEFAULT_REGION[provider]
    if provider == "aws":
        if not isinstance(region, str) or not re.fullmatch(r"[a-z]{2}(-gov)?-[a-z]+-\d", region):
            raise ConfigError(f"--region {region!r}: expected an AWS region such as us-west-2")
        return region, f"{region}a,{region}b,{region}c"
    m = re.fullmatch(r"([a-z]+-[a-z]+\d)(-[a-z])?", region) if isinstance(region, str) else None
    if not m:
        raise ConfigError(f"--region {region!r}: expected a GCP region or zone such as us-central1 or us-central1-a")
    return m.group(1), region if m.group(2) else f"{region}-a"


def _aws_node(instance: str, profile: str, disk_gb: int, spot: bool, machine_image: str | None) -> dict:
    node: dict[str, Any] = {
        "InstanceType": instance,
        # S3 access (datasets, checkpoints, Tune state) comes from this instance profile's role
        "IamInstanceProfile": {"Arn": profile},
        "BlockDeviceMappings": [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": disk_gb, "VolumeType": "gp3"}}],
    }
    if machine_image:
        node["ImageId"] = machine_image
    if spot:
        node["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
            "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
    return node


def _gcp_node(machine: str, account: str, scopes: list[str], disk_gb: int, accelerator: tuple[str, int] | None,
              spot: bool, machine_image: str | None) -> dict:
    node: dict[str, Any] = {
        "machineType": machine,
        "disks": [{"boot": True, "autoDelete": True, "type": "PERSISTENT",
                   "initializeParams": {"diskSizeGb": disk_gb, "sourceImage": machine_image or GCP_IMAGE}}],
        # GCS access comes from this service account, limited by its IAM roles and these scopes
        "serviceAccounts": [{"email": account, "scopes": scopes}],
    }
    if accelerator:
        node["guestAccelerators"] = [{"acceleratorType": accelerator[0], "acceleratorCount": accelerator[1]}]
        node["metadata"] = {"items": [{"key": "install-nvidia-driver", "value": "True"}]}
        scheduling: dict[str, Any] = {"onHostMaintenance": "TERMINATE", "automaticRestart": False}
        if spot:
            scheduling.update(provisioningModel="SPOT", instanceTerminationAction="DELETE")
        node["scheduling"] = scheduling
    return node


def render_cluster(provider: str, sweep=None, workers: int | None = None, gpu_type: str = "a100",
                   spot: bool = False, region: str | None = None, image: str | None = None,
                   cluster_name: str | None = None, *, project: str | None = None,
                   head_identity: str | None = None, worker_identity: str | None = None,
                   machine_image: str | None = None, idle_timeout_minutes: int = 10) -> dict:
    """A `ray up` config for GPU training of a sweep (a SweepSpec, or None for a generic cluster).

    max_workers: `workers`, else the GPU nodes that run all of the sweep's concurrent trials at
    once (else 2). Identities: an instance-profile ARN (aws) or service-account email (gcp) for the
    head and the workers; the defaults name ACCOUNT_ID / PROJECT_ID placeholders to replace.
    """
    if provider not in PROVIDERS:
        raise ConfigError(f"provider {provider!r}: expected aws or gcp")
    table = GPU_TABLES[provider]
    if gpu_type not in table:
        raise ConfigError(f"gpu type {gpu_type!r}: not offered on {provider} here; expected one of "
                          f"{', '.join(sorted(table))}")
    if workers is not None and (not isinstance(workers, int) or not 1 <= workers <= INT32_MAX):
        raise ConfigError(f"workers={workers!r}: expected a positive integer (at most {INT32_MAX})")
    if image is not None:
        check_image("--image", image)
    if project is not None:
        check_gcp_project("--project", project)
    for flag, value in (("--head-identity", head_identity), ("--worker-identity", worker_identity),
                        ("--machine-image", machine_image)):
        if value is not None and (not isinstance(value, str) or not _PLAIN.fullmatch(value)):
            raise ConfigError(f"{flag}={value!r:.120}: expected an ARN, e-mail, image id or path (letters, digits "
                              "and :/_.@=,+-; the launcher passes it through a shell)")
    machine, accel, node_gpus, node_cpus = table[gpu_type]
    name = _cluster_name(cluster_name, sweep)
    region, zone = _region_zone(provider, region)

    needs = sweep_needs(sweep) if sweep is not None else None
    if needs is not None:
        wanted = nodes_for(needs, node_gpus, node_cpus)
        max_workers = workers if workers is not None else wanted
        per_node = trials_per_node(needs, node_gpus, node_cpus)
        if per_node < 1:
            per_trial = max(math.ceil(needs.gpus_per_trial / node_gpus), math.ceil(needs.cpus_per_trial / node_cpus))
            if per_trial > max_workers:
                raise ConfigError(f"sweep {needs.sweep}: one trial needs {needs.gpus_per_trial} GPU(s) and "
                                  f"{needs.cpus_per_trial:g} CPU(s), {per_trial} {machine} nodes; "
                                  f"--workers {max_workers} is too few")
            at_once = max_workers // per_trial
        else:
            at_once = per_node * max_workers
    else:
        max_workers = workers if workers is not None else DEFAULT_WORKERS

    worker_resources = {"CPU": node_cpus, "GPU": node_gpus}
    if provider == "aws":
        head_identity = head_identity or "arn:aws:iam::ACCOUNT_ID:instance-profile/vis4mer-ray-head"
        worker_identity = worker_identity or "arn:aws:iam::ACCOUNT_ID:instance-profile/vis4mer-ray-worker"
        provider_cfg: dict[str, Any] = {"type": "aws", "region": region, "availability_zone": zone,
                                        "cache_stopped_nodes": False}
        head_node = _aws_node(HEAD_MACHINE["aws"], head_identity, 200, False, machine_image)
        worker_node = _aws_node(machine, worker_identity, 500, spot, machine_image)
        head_setup = ["pip install -q 'boto3>=1.34'"]  # the autoscaler on the head launches EC2 nodes
        extra = ""
        worker_init: list[str] = []
    else:
        project = project or "PROJECT_ID"
        head_identity = head_identity or f"ray-autoscaler-sa-v1@{project}.iam.gserviceaccount.com"
        worker_identity = worker_identity or f"vis4mer-worker@{project}.iam.gserviceaccount.com"
        provider_cfg = {"type": "gcp", "region": region, "availability_zone": zone, "project_id": project}
        head_node = _gcp_node(HEAD_MACHINE["gcp"], head_identity, [GCP_CLOUD_SCOPE], 200, None, False, machine_image)
        worker_node = _gcp_node(machine, worker_identity, [GCP_STORAGE_SCOPE], 500, (accel, node_gpus), spot,
                                machine_image)
        head_setup = ["pip install -q google-api-python-client"]  # the autoscaler on the head launches GCE nodes
        extra = "[gcs]"
        # the Deep Learning VM installs the NVIDIA driver at first boot: wait for it before docker starts
        worker_init = ['timeout 600 bash -c "until nvidia-smi > /dev/null 2>&1; do sleep 5; done"']

    worker_type: dict[str, Any] = {"min_workers": 0, "max_workers": max_workers, "resources": worker_resources,
                                   "node_config": worker_node}
    if worker_init:
        worker_type["initialization_commands"] = worker_init
    cfg: dict[str, Any] = {
        "cluster_name": name,
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": provider_cfg,
        "auth": {"ssh_user": "ubuntu"},
        "docker": {
            "image": image or default_image(),
            "container_name": "vis4mer",
            "pull_before_run": True,
            "run_options": ["--shm-size=32g", "--ulimit nofile=65536:65536"],
        },
        "available_node_types": {
            HEAD: {"resources": {"CPU": 0}, "node_config": head_node},
            (SPOT_WORKER if spot else GPU_WORKER): worker_type,
        },
        "head_node_type": HEAD,
        "file_mounts": {REMOTE_DIR: "."},
        "rsync_exclude": ["/.venv", "/.git", "/data", "/results", "/checkpoints", "/mlruns", "/mlartifacts",
                          "/mlflow.db", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"],
        "setup_commands": [f'pip install -q -c $HOME/vis4mer/constraints.txt "$HOME/vis4mer{extra}"'],
        "head_setup_commands": head_setup,
        "worker_setup_commands": [],
    }
    meta: dict[str, Any] = {"provider": provider, "gpu_type": gpu_type, "instance": machine, "gpus_per_node": node_gpus,
                            "spot": spot}
    if needs is not None:
        meta.update(asdict(needs))
        meta["trials_at_once"] = min(needs.concurrent, at_once)
    cfg["metadata"] = {"vis4mer": meta}
    return cfg


def placeholders(cfg: dict) -> list[str]:
    text = json.dumps(cfg)
    return [p for p in PLACEHOLDERS if p in text]


def cluster_file(cfg: dict, path: str | None = None) -> str:
    """The config as YAML with a header naming the commands (`ray up` reads it as is; comments only)."""
    target = path or "CLUSTER.yaml"
    m = cfg.get("metadata", {}).get("vis4mer", {})
    lines = [
        f"ray up {target}        # start the head; GPU workers come and go with the sweep's demand",
        f"ray dashboard {target} # forward the dashboard (and job API) to http://127.0.0.1:8265",
        f"ray down {target}      # terminate every node",
        "Rendered by `vis4mer cloud render`; checked against Ray's ray-schema.json (`vis4mer cloud validate`).",
    ]
    if m:
        lines.append(f"{m.get('provider')}: head CPU-only (runs no trials), up to {cfg['max_workers']} x "
                     f"{m.get('instance')} ({m.get('gpus_per_node')} x {m.get('gpu_type')}), "
                     f"{'spot/preemptible' if m.get('spot') else 'on demand'}")
        if "trials" in m:
            lines.append(f"sweep {m['sweep']}: {m['trials']} trials, {m['gpus_per_trial']} GPU(s) and "
                         f"{m['cpus_per_trial']:g} CPU(s) each; {m['trials_at_once']} at once on this cluster "
                         f"(set budget.max_concurrent_trials to that: Tune's automatic limit only sees running nodes)")
    left = placeholders(cfg)
    if left:
        lines.append(f"Replace {' and '.join(left)} (or render with --head-identity/--worker-identity"
                     f"{'/--project' if 'PROJECT_ID' in left else ''}).")
    return dump_yaml(cfg, lines)


# -------------------------------------------------------------------------------- validate


def _check_schema(obj: dict) -> None:
    import jsonschema

    with open(schema_path()) as f:
        schema = json.load(f)
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise ConfigError(f"{schema_error(best, schema_name='ray-schema.json')} (ray-schema.json)")


def _ray_checks(obj: dict) -> dict:
    """Ray's own preparation and checks (what `ray up` runs before it contacts the cloud)."""
    import logging

    from ray.autoscaler._private.util import prepare_config, validate_config

    log = logging.getLogger("ray.autoscaler._private.util")
    level = log.level
    log.setLevel(logging.WARNING)  # "setting max workers for head node type to 0" is not news
    try:
        prepared = prepare_config(copy.deepcopy(obj))
        validate_config(prepared)
    except Exception as e:  # ValueError, AssertionError, jsonschema.ValidationError ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{msg} (ray's validate_config)") from None
    finally:
        log.setLevel(level)
    return prepared


# fields whose name says "key" but whose value is a path on the launching machine (`ray up`'s own)
_KEY_FILE_FIELDS = {"ssh_private_key"}
_SECRET_TEXT = [
    (re.compile(r"aws_secret_access_key|aws_session_token", re.IGNORECASE), "an AWS secret key or session token"),
    (re.compile(r"aws_access_key_id\s*=", re.IGNORECASE), "an AWS access key id"),
    (re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b"), "an AWS access key id"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\"type\"\s*:\s*\"service_account\""), "a GCP service-account key"),
    (re.compile(r"GOOGLE_APPLICATION_CREDENTIALS\s*=", re.IGNORECASE), "a GCP key file"),
]


def _walk(obj, parts=()):
    yield parts, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, parts + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, parts + (i,))


def find_credentials(obj) -> list[tuple[str, str]]:
    """(path, what) for every literal credential in a config: key names and secret-looking text."""
    found = []
    for parts, value in _walk(obj):
        if parts and isinstance(parts[-1], str) and names_secret(parts[-1]) and parts[-1] not in _KEY_FILE_FIELDS:
            found.append((json_path(parts), f"a credential key {parts[-1]!r}"))
        elif isinstance(value, str):
            for pattern, what in _SECRET_TEXT:
                if pattern.search(value):
                    found.append((json_path(parts), what))
                    break
    return found


def _has_gpu_hardware(provider: str, node: dict) -> bool:
    if provider == "aws":
        return bool(re.match(r"^(p\d|g\d|gr\d|inf\d|trn\d|dl\d)", str(node.get("InstanceType", ""))))
    return bool(node.get("guestAccelerators")) or bool(re.match(r"^(a2|a3|a4|g2)-", str(node.get("machineType", ""))))


def is_spot(provider: str, node: dict) -> bool:
    if provider == "aws":
        return str((node.get("InstanceMarketOptions") or {}).get("MarketType", "")).lower() == "spot"
    s = node.get("scheduling") or {}
    items = s if isinstance(s, list) else [s]
    return any(isinstance(i, dict)
               and (i.get("preemptible") is True or str(i.get("provisioningModel")).upper() == "SPOT")
               for i in items)


def _check_structure(obj: dict) -> None:
    """Ray's validate_config checks, stated first with the path they concern."""
    types = obj["available_node_types"]
    counts = [("max_workers", obj.get("max_workers"))] + [(f"available_node_types.{name}.{k}", nt.get(k))
                                                          for name, nt in types.items()
                                                          for k in ("min_workers", "max_workers")]
    for where, v in counts:  # the schema says integer; the launcher and the clouds' APIs take int32
        if v is not None and not 0 <= v <= INT32_MAX:
            raise ConfigError(f"{where}={v}: expected an integer from 0 to {INT32_MAX}")
    if obj["head_node_type"] not in types:
        raise ConfigError(f"head_node_type: {obj['head_node_type']!r}; expected one of the available_node_types "
                          f"({', '.join(types)})")
    total_min = sum(nt.get("min_workers", 0) for nt in types.values())
    if total_min > obj.get("max_workers", total_min):
        raise ConfigError(f"max_workers={obj['max_workers']}: expected >= the sum of the node types' min_workers "
                          f"({total_min})")
    for name, nt in types.items():
        lo, hi = nt.get("min_workers", 0), nt.get("max_workers")
        if hi is not None and lo > hi:
            raise ConfigError(f"available_node_types.{name}.min_workers={lo}: expected <= its max_workers ({hi})")
    d = obj.get("docker")
    if d and bool(d.get("container_name")) != bool(d.get("image") or (d.get("head_image") and d.get("worker_image"))):
        raise ConfigError("docker: expected both an image and a container_name (or neither)")


def _check_policy(obj: dict) -> None:
    for where, what in find_credentials(obj):
        raise ConfigError(f"{where}: {what} in the cluster config; expected none (nodes get object-store access "
                          "from the instance profile / service account)")
    provider = obj["provider"]["type"]
    head_type = obj["head_node_type"]
    head = obj["available_node_types"][head_type]
    where = f"available_node_types.{head_type}"
    gpus = head["resources"].get("GPU")
    if gpus:
        raise ConfigError(f"{where}.resources.GPU={gpus}: expected 0 or absent (the head runs no training)")
    if gpus is None and _has_gpu_hardware(provider, head["node_config"]):
        raise ConfigError(f"{where}.node_config: a GPU machine as the head; expected a CPU machine, or "
                          "resources.GPU: 0 (the head runs no training)")
    if is_spot(provider, head["node_config"]):
        raise ConfigError(f"{where}.node_config: a spot/preemptible head; expected on demand (losing the head "
                          "loses the cluster and the sweep's driver)")
    for name, nt in obj["available_node_types"].items():
        if name == head_type:
            continue
        nc = nt["node_config"]
        if provider == "aws" and not (nc.get("IamInstanceProfile") or {}).get("Arn"):
            raise ConfigError(f"available_node_types.{name}.node_config.IamInstanceProfile.Arn: required, missing "
                              "(workers reach S3 through the instance profile)")
        if provider == "gcp" and not nc.get("serviceAccounts"):
            raise ConfigError(f"available_node_types.{name}.node_config.serviceAccounts: required, missing "
                              "(workers reach GCS through the service account)")


def validate_cluster_config(obj: Any, where: str | None = None) -> dict:
    """Checks a `ray up` config as Ray does (ray-schema.json, prepare_config, validate_config), then
    vis4mer's rules; returns Ray's prepared config. Raises ConfigError naming the path."""
    prefix = f"{where}: " if where else ""
    try:
        if not isinstance(obj, dict):
            raise ConfigError(f"(top level): expected a mapping, got {type(obj).__name__}")
        _check_schema(obj)
        ptype = obj["provider"]["type"]
        if ptype not in PROVIDERS:
            raise ConfigError(f"provider.type: {ptype!r}; expected aws or gcp")
        if "available_node_types" not in obj or "head_node_type" not in obj:
            raise ConfigError(f"{'head_node_type' if 'available_node_types' in obj else 'available_node_types'}: "
                              "required, missing")
        _check_structure(obj)
        prepared = _ray_checks(obj)
        _check_policy(obj)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}") from None
    return prepared


def load_cluster_file(path: str) -> dict:
    return load_yaml(path, "cluster config")
