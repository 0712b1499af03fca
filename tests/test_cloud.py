"""Cloud clusters with Ray's cluster launcher: the shipped configs and rendered ones validate against
the ray-schema.json inside the installed ray package (what `ray up` checks); a CPU-only head, GPU
workers from zero, spot only when asked, identities instead of keys; broken configs are refused
naming the path; the CLI end to end. No Ray cluster and no cloud are needed."""
from __future__ import annotations

import copy
import functools
import glob
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.runs import ROOT, VIS4MER
from vis4mer.orchestrator.deploy.cloud import (
    GPU_WORKER,
    SPOT_WORKER,
    cluster_file,
    find_credentials,
    is_spot,
    render_cluster,
    schema_path,
    sweep_needs,
    validate_cluster_config,
)
from vis4mer.orchestrator.sweep.spec import load_sweep
from vis4mer.orchestrator.train.config import ConfigError

SHIPPED = sorted(glob.glob(str(ROOT / "deploy" / "cloud" / "*.yaml")))
SWEEPS = sorted(p for p in glob.glob(str(ROOT / "sweeps" / "*.yaml")) if not Path(p).name.startswith("train_"))


@functools.cache
def _sweep(path: str):
    return load_sweep(path)


def _load(path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _gpu_types(cfg) -> dict:
    return {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}


def check_properties(cfg: dict, spot: bool | None) -> None:
    """spot None: a shipped config (both worker types, spot off by default)."""
    provider = cfg["provider"]["type"]
    head = cfg["available_node_types"][cfg["head_node_type"]]
    # the head runs no training: Ray sees no CPU (so no trial, no Train worker) and no GPU there
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    assert not is_spot(provider, head["node_config"]), "the head is always on demand"
    if provider == "aws":
        assert not head["node_config"]["InstanceType"].startswith(("p", "g"))
    else:
        assert "guestAccelerators" not in head["node_config"] and "scheduling" not in head["node_config"]
    workers = _gpu_types(cfg)
    assert workers
    for name, nt in workers.items():
        assert nt["min_workers"] == 0, f"{name}: GPU workers autoscale from zero"
        assert nt["resources"]["GPU"] >= 4 and nt["resources"]["CPU"] >= 48
        assert nt["max_workers"] <= cfg["max_workers"]
        if provider == "gcp":
            acc = nt["node_config"]["guestAccelerators"][0]
            assert acc["acceleratorCount"] == nt["resources"]["GPU"]
            assert nt["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE"
    spot_types = {n for n, nt in workers.items() if is_spot(provider, nt["node_config"])}
    if spot is None:
        assert spot_types == {SPOT_WORKER} and workers[SPOT_WORKER]["max_workers"] == 0, "spot is opt-in"
        assert workers[GPU_WORKER]["max_workers"] == cfg["max_workers"]
    elif spot:
        assert spot_types == set(workers) == {SPOT_WORKER}
    else:
        assert spot_types == set() and set(workers) == {GPU_WORKER}
        text = json.dumps(cfg)
        assert "InstanceMarketOptions" not in text and "SPOT" not in text and "preemptible" not in text
    # object-store access from the cloud's identity, on every node
    for name, nt in cfg["available_node_types"].items():
        nc = nt["node_config"]
        if provider == "aws":
            assert nc["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        else:
            sa = nc["serviceAccounts"][0]
            assert sa["email"].endswith(".iam.gserviceaccount.com") and sa["scopes"], name
    assert "gcp_credentials" not in cfg["provider"]
    assert find_credentials(cfg) == []
    # the project's container, with shared memory for Ray's object store
    d = cfg["docker"]
    assert d["image"] and d["container_name"] and any(o.startswith("--shm-size") for o in d["run_options"])
    assert any("pip install" in c and "vis4mer" in c for c in cfg["setup_commands"])


def test_schema_is_rays_own():
    import ray

    assert schema_path() == os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")
    assert os.path.exists(schema_path())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: Path(p).name)
def test_shipped_configs_validate(path):
    text = Path(path).read_text()
    name = Path(path).name
    assert text.startswith(f"# ray up deploy/cloud/{name}") and f"# ray down deploy/cloud/{name}" in text
    cfg = _load(path)
    prepared = validate_cluster_config(cfg, path)
    assert prepared["head_node_type"] == "head"
    check_properties(cfg, spot=None)
    for word in ("aws_secret_access_key", "aws_access_key_id=", "AKIA", "PRIVATE KEY", "gcp_credentials:"):
        body = "\n".join(line for line in text.lower().splitlines() if not line.lstrip().startswith("#"))
        assert word.lower() not in body


def test_both_providers_shipped():
    assert {Path(p).name for p in SHIPPED} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("spot", [False, True], ids=["on_demand", "spot"])
@pytest.mark.parametrize("provider", ["aws", "gcp"])
@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: Path(p).stem)
def test_rendered_for_every_shipped_sweep_validates(sweep, provider, spot):
    cfg = render_cluster(provider, _sweep(sweep), spot=spot)
    validate_cluster_config(cfg)
    check_properties(cfg, spot=spot)
    # the YAML that is written reads back to the same config
    assert yaml.safe_load(cluster_file(cfg)) == cfg


@pytest.mark.parametrize("provider", ["aws", "gcp"])
@pytest.mark.parametrize("gpu", ["a100", "h100", "l4", "t4"])
def test_gpu_table(provider, gpu):
    cfg = render_cluster(provider, None, workers=3, gpu_type=gpu)
    validate_cluster_config(cfg)
    check_properties(cfg, spot=False)
    assert cfg["max_workers"] == 3 == cfg["available_node_types"][GPU_WORKER]["max_workers"]


def test_sizing_from_the_sweep():
    spec = _sweep(str(ROOT / "sweeps" / "demo.yaml"))
    needs = sweep_needs(spec)
    # demo: grid d_state [16, 32] x num_samples 4; CPU trials of 1 worker x 1 CPU + the trial driver
    assert (needs.trials, needs.gpus_per_trial, needs.cpus_per_trial) == (8, 0, 2)
    gpu_spec = load_sweep(str(ROOT / "sweeps" / "demo.yaml"), ["scaling.use_gpu=true", "scaling.num_workers=2",
                                                               "scaling.cpus_per_worker=8"])
    needs = sweep_needs(gpu_spec)
    assert (needs.gpus_per_trial, needs.cpus_per_trial) == (2, 17)
    cfg = render_cluster("aws", gpu_spec)  # 8 trials x 2 GPUs, 4 per p4d node (96 CPUs fit 5)
    assert cfg["max_workers"] == 2 and cfg["metadata"]["vis4mer"]["trials_at_once"] == 8
    cfg = render_cluster("aws", gpu_spec, workers=1)  # --workers caps it
    assert cfg["max_workers"] == 1 and cfg["metadata"]["vis4mer"]["trials_at_once"] == 4
    assert render_cluster("gcp", gpu_spec, gpu_type="t4")["max_workers"] == 4  # 2 trials per 4-GPU node
    big = load_sweep(str(ROOT / "sweeps" / "demo.yaml"), ["scaling.use_gpu=true", "scaling.num_workers=16"])
    assert render_cluster("aws", big)["max_workers"] == 16  # 8 trials x 2 nodes each
    with pytest.raises(ConfigError, match="one trial needs 16 GPU.*2 p4d.24xlarge nodes; --workers 1 is too few"):
        render_cluster("aws", big, workers=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(provider="azure"), "provider 'azure': expected aws or gcp"),
    (dict(provider="gcp", gpu_type="a10g"), "gpu type 'a10g': not offered on gcp"),
    (dict(provider="aws", gpu_type="tpu"), "gpu type 'tpu'"),
    (dict(provider="aws", region="mars-1"), "--region 'mars-1': expected an AWS region"),
    (dict(provider="gcp", region="us_central1"), "--region 'us_central1': expected a GCP region or zone"),
    (dict(provider="aws", cluster_name="My_Cluster"), "cluster_name 'My_Cluster': expected lowercase"),
    (dict(provider="aws", workers=0), "workers=0: expected a positive integer"),
])
def test_render_refuses(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        render_cluster(**kwargs)


def test_render_options():
    cfg = render_cluster("gcp", None, region="europe-west4-b", image="ghcr.io/acme/vis4mer:1.0", project="acme-ml",
                         cluster_name="sweeps-a", machine_image="projects/acme-ml/global/images/dl")
    validate_cluster_config(cfg)
    assert cfg["provider"] == {"type": "gcp", "region": "europe-west4", "availability_zone": "europe-west4-b",
                               "project_id": "acme-ml"}
    assert cfg["docker"]["image"] == "ghcr.io/acme/vis4mer:1.0" and cfg["cluster_name"] == "sweeps-a"
    assert "PROJECT_ID" not in json.dumps(cfg) and "acme-ml.iam.gserviceaccount.com" in json.dumps(cfg)
    cfg = render_cluster("aws", None, head_identity="arn:aws:iam::111122223333:instance-profile/h",
                         worker_identity="arn:aws:iam::111122223333:instance-profile/w", machine_image="ami-0123")
    nodes = cfg["available_node_types"]
    assert nodes["head"]["node_config"]["IamInstanceProfile"]["Arn"].endswith("/h")
    assert nodes[GPU_WORKER]["node_config"]["IamInstanceProfile"]["Arn"].endswith("/w")
    assert nodes[GPU_WORKER]["node_config"]["ImageId"] == "ami-0123"


def _aws():
    return _load(ROOT / "deploy" / "cloud" / "aws.yaml")


def _gcp():
    return _load(ROOT / "deploy" / "cloud" / "gcp.yaml")


def _set(cfg, dotted, value):
    *parents, last = dotted.split(".")
    d = cfg
    for p in parents:
        d = d[p]
    if value is _DEL:
        del d[last]
    else:
        d[last] = value
    return cfg


_DEL = object()
NT = "available_node_types"


@pytest.mark.parametrize("make,match", [
    (lambda: _set(_aws(), "max_workers", "many"), r"^bad.yaml: max_workers: expected an integer, got str 'many'"),
    (lambda: _set(_aws(), "max_workers", -1), r"max_workers: expected >= 0, got -1"),
    (lambda: _set(_aws(), "clusters", 3), r"^bad.yaml: clusters: unknown field"),
    (lambda: _set(_aws(), "provider.type", _DEL), r"^bad.yaml: provider.type: required field missing"),
    (lambda: _set(_aws(), "provider", _DEL), r"provider: required field missing"),
    (lambda: _set(_aws(), "docker.shm", "32g"), r"docker.shm: unknown field"),
    (lambda: _set(_aws(), f"{NT}.gpu_worker.resources.GPU", "eight"),
     r"available_node_types.gpu_worker.resources.GPU: expected an integer, got str 'eight'"),
    (lambda: _set(_aws(), f"{NT}.gpu_worker.node_type", "p4d"),
     r"available_node_types.gpu_worker.node_type: unknown field"),
    (lambda: _set(_aws(), f"{NT}.head.node_config", _DEL), r"available_node_types.head.node_config: required"),
    (lambda: _set(_aws(), "setup_commands", "pip install ."), r"setup_commands: expected an array"),
    (lambda: _set(_aws(), "provider.type", "azure"), r"provider.type: 'azure'; expected aws or gcp"),
    (lambda: _set(_aws(), "head_node_type", "gpu"), r"head_node_type: 'gpu'; expected one of"),
    (lambda: _set(_aws(), f"{NT}.gpu_worker.min_workers", 3), r"max_workers=2: expected >= the sum of"),
    (lambda: _set(_aws(), "docker.container_name", _DEL), r"docker: expected both an image and a container_name"),
    # a head that can take GPU work
    (lambda: _set(_aws(), f"{NT}.head.resources", {"CPU": 0, "GPU": 8}),
     r"available_node_types.head.resources.GPU=8: expected 0 or absent"),
    (lambda: _set(_set(_aws(), f"{NT}.head.resources", {}), f"{NT}.head.node_config.InstanceType", "g5.48xlarge"),
     r"available_node_types.head.node_config: a GPU machine as the head"),
    (lambda: _set(_set(_gcp(), f"{NT}.head.resources", {"CPU": 8}), f"{NT}.head.node_config.guestAccelerators",
                  [{"acceleratorType": "nvidia-l4", "acceleratorCount": 1}]), r"a GPU machine as the head"),
    (lambda: _set(_aws(), f"{NT}.head.node_config.InstanceMarketOptions", {"MarketType": "spot"}),
     r"available_node_types.head.node_config: a spot/preemptible head"),
    (lambda: _set(_gcp(), f"{NT}.head.node_config.scheduling", {"preemptible": True}), r"spot/preemptible head"),
    # literal credentials
    (lambda: _set(_aws(), "provider.aws_access_key_id", "AKIAIOSFODNN7EXAMPLE"),
     r"provider.aws_access_key_id: a credential key"),
    (lambda: _set(_aws(), "setup_commands", ["export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG && pip install ."]),
     r"setup_commands\[0\]: an AWS secret key"),
    (lambda: _set(_aws(), "docker.run_options", ["--shm-size=32g", "-e", "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE"]),
     r"docker.run_options\[2\]: an AWS access key id"),
    (lambda: _set(_aws(), "head_start_ray_commands", ["aws configure set aws_secret_access_key abc; ray start --head"]),
     r"head_start_ray_commands\[0\]: an AWS secret key"),
    (lambda: _set(_gcp(), "provider.gcp_credentials", {"type": "service_account", "credentials": "{}"}),
     r"provider.gcp_credentials: a credential key"),
    (lambda: _set(_gcp(), "file_mounts", {"/key.json": "-----BEGIN PRIVATE KEY-----\nabc"}),
     r"file_mounts./key.json: a private key"),
    # identities
    (lambda: _set(_aws(), f"{NT}.gpu_worker.node_config.IamInstanceProfile", _DEL),
     r"available_node_types.gpu_worker.node_config.IamInstanceProfile.Arn: required"),
    (lambda: _set(_gcp(), f"{NT}.gpu_worker_spot.node_config.serviceAccounts", _DEL),
     r"available_node_types.gpu_worker_spot.node_config.serviceAccounts: required"),
])
def test_broken_configs_refused(make, match):
    with pytest.raises(ConfigError, match=match):
        validate_cluster_config(make(), "bad.yaml")


def test_not_a_mapping():
    with pytest.raises(ConfigError, match=r"\(top level\): expected a mapping"):
        validate_cluster_config(["ray"])


def test_validation_does_not_modify_the_config():
    cfg = _gcp()
    before = copy.deepcopy(cfg)
    validate_cluster_config(cfg)
    assert cfg == before


# ------------------------------------------------------------------------------------ CLI


def _cli(*args, cwd=ROOT):
    return subprocess.run([*VIS4MER, "cloud", *args], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=120)


def test_cli_render_and_validate(tmp_path):
    out = tmp_path / "clusters" / "demo.yaml"
    r = _cli("render", "--provider", "aws", "--sweep", "sweeps/demo.yaml", "--spot", "--gpu-type", "h100",
             "--region", "us-east-1", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "ACCOUNT_ID" in r.stdout
    text = out.read_text()
    assert text.startswith(f"# ray up {out}") and f"# ray down {out}" in text
    cfg = yaml.safe_load(text)
    validate_cluster_config(cfg)
    check_properties(cfg, spot=True)
    assert cfg["available_node_types"][SPOT_WORKER]["node_config"]["InstanceType"] == "p5.48xlarge"
    assert cfg["provider"]["region"] == "us-east-1" and cfg["cluster_name"] == "vis4mer-demo"
    assert [p.name for p in out.parent.iterdir()] == ["demo.yaml"]  # no temporary file left

    r = _cli("render", "--provider", "gcp", "--workers", "3", "--project", "acme-ml")  # to stdout
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    validate_cluster_config(cfg)
    check_properties(cfg, spot=False)
    assert cfg["max_workers"] == 3 and cfg["provider"]["project_id"] == "acme-ml"

    r = _cli("validate", "deploy/cloud/aws.yaml", "deploy/cloud/gcp.yaml", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok: ") == 3


@pytest.mark.parametrize("args,match", [
    (["render", "--provider", "azure"], "argument --provider: invalid choice: 'azure'"),
    (["render", "--provider", "aws", "--workers", "0"], "argument --workers: 0 is not a positive integer"),
    (["render", "--provider", "gcp", "--gpu-type", "a10g"], "gpu type 'a10g': not offered on gcp"),
    (["render", "--provider", "aws", "--sweep", "sweeps/nope.yaml"], "sweeps/nope.yaml: no such sweep file"),
])
def test_cli_bad_arguments_exit_2_and_write_nothing(tmp_path, args, match):
    out = tmp_path / "c.yaml"
    r = _cli(*args, "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0], r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_validate_refuses_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    cfg = _aws()
    cfg["max_workers"] = "many"
    bad.write_text(yaml.safe_dump(cfg))
    r = _cli("validate", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}: max_workers: expected an integer, got str 'many'" in lines[0]
