"""KubeRay manifests: the shipped ones and a RayJob rendered for every shipped sweep validate against
the KubeRay CRD schemas (../shared/kuberay-crds) and have the properties a GPU sweep needs; broken
manifests are refused naming the path; `vis4mer k8s render|validate` end to end. No Ray, no cluster."""
from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.runs import ROOT, VIS4MER
from vis4mer.orchestrator.deploy.k8s import (
    CREDENTIALS,
    k8s_name,
    load_manifests,
    render,
    render_rayjob,
    validate_manifest,
)
from vis4mer.orchestrator.secret_names import names_secret
from vis4mer.orchestrator.sweep.spec import load_sweep
from vis4mer.orchestrator.train.config import ConfigError

DEPLOY = ROOT / "deploy" / "kuberay"
SWEEPS = sorted(p for p in (ROOT / "sweeps").glob("*.yaml") if not p.name.startswith("train_"))
IMAGE = "registry.example.com/vis4mer:0.1.0"
MLFLOW = "http://mlflow.mlflow.svc:5000"
STORAGE = ["data.uri=s3://vis4mer-data/some/task", "run.storage_path=s3://vis4mer-runs/results"]
SECRET_SENTINEL = "sentinel-secret-value-7f3a9c"


@pytest.fixture(scope="module")
def spec_cache():
    cache: dict[str, object] = {}

    def get(path: Path):
        if str(path) not in cache:
            cache[str(path)] = load_sweep(str(path))
        return cache[str(path)]
    return get


def _containers(cluster: dict):
    head = cluster["headGroupSpec"]["template"]["spec"]
    yield "head", head, head["containers"][0]
    for g in cluster["workerGroupSpecs"]:
        yield g["groupName"], g["template"]["spec"], g["template"]["spec"]["containers"][0]


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    else:
        yield str(node)


def check_cluster(cluster: dict, secret: str = "vis4mer-credentials", workers: int | None = None) -> None:
    """The properties deploy/kuberay promises for the cluster of a GPU sweep."""
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # a string, as KubeRay wants
    assert cluster["enableInTreeAutoscaling"] is True
    opts = cluster["autoscalerOptions"]
    assert opts["version"] == "v2" and opts["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    assert opts["idleTimeoutSeconds"] > 0
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
    if workers is not None:
        assert group["maxReplicas"] == workers
    pod = group["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    res = pod["containers"][0]["resources"]
    gpus = res["limits"]["nvidia.com/gpu"]
    assert int(gpus) >= 1 and res["requests"]["nvidia.com/gpu"] == gpus
    for name, podspec, c in _containers(cluster):
        shm = [v for v in podspec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
        assert shm, f"{name}: no memory-backed volume"
        assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in c["volumeMounts"], name
        env = {e["name"]: e for e in c["env"]}
        assert "RAY_enable_autoscaler_v2" not in env  # KubeRay refuses it together with autoscalerOptions.version
        for cred, optional in CREDENTIALS:
            ref = env[cred]["valueFrom"]["secretKeyRef"]
            assert "value" not in env[cred] and ref["name"] == secret and ref["key"] == cred
            assert ref.get("optional", False) == optional
        for e in c["env"]:
            if names_secret(e["name"]):
                assert "value" not in e and "secretKeyRef" in e["valueFrom"], e["name"]


def check_rayjob(job: dict, **kw) -> None:
    s = job["spec"]
    assert re.match(r"vis4mer sweep (--max-concurrent-trials \d+ )?/home/ray/vis4mer/sweeps/", s["entrypoint"])
    assert s["submitterConfig"]["backoffLimit"] == 0 and s["backoffLimit"] == 0
    assert s["preRunningDeadlineSeconds"] > 0
    assert s["shutdownAfterJobFinishes"] is True and s["ttlSecondsAfterFinished"] > 0
    check_cluster(s["rayClusterSpec"], **kw)


# ------------------------------------------------------------------------------------------ shipped


def test_shipped_manifests_validate():
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob.yaml"}
    for f in files:
        for doc in load_manifests(str(f)):
            validate_manifest(doc, where=f.name)


def test_shipped_manifests_have_the_properties():
    job = load_manifests(str(DEPLOY / "rayjob.yaml"))[0]
    cluster = load_manifests(str(DEPLOY / "raycluster.yaml"))[0]
    check_rayjob(job, workers=4)
    check_cluster(cluster["spec"], workers=4)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]  # one cluster design, two ways to run it
    # vis4mer reads the MLflow URI from tracking.tracking_uri (MLFLOW_TRACKING_URI is not consulted)
    assert f"tracking.tracking_uri={MLFLOW}" in job["spec"]["entrypoint"]


def test_shipped_rayjob_is_what_render_makes(spec_cache):
    """The header's command reproduces the file, so the file and the renderer cannot drift apart."""
    shipped = load_manifests(str(DEPLOY / "rayjob.yaml"))[0]
    rendered = render_rayjob(spec_cache(ROOT / "sweeps" / "lvu_genre.yaml"), IMAGE, workers=4, gpus_per_worker=1,
                             mlflow_uri=MLFLOW, overrides=["data.uri=s3://vis4mer-data/lvu/genre",
                                                           "run.storage_path=s3://vis4mer-runs/results"])
    assert shipped == rendered


# ------------------------------------------------------------------------------------------ render


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_shipped_sweep_renders_a_valid_rayjob(path, spec_cache):
    spec = spec_cache(path)
    job, sizing = render(spec, IMAGE, workers=3, gpus_per_worker=2, mlflow_uri=MLFLOW, overrides=STORAGE,
                         secret_name="my-creds", namespace="ml")
    validate_manifest(job, where=path.name)
    check_rayjob(job, secret="my-creds", workers=3)
    assert job["metadata"]["name"] == k8s_name(spec.name) and job["metadata"]["namespace"] == "ml"
    assert job["spec"]["entrypoint"] == (f"vis4mer sweep --max-concurrent-trials {sizing.max_trials} "
                                         f"/home/ray/vis4mer/sweeps/{path.name} "
                                         + " ".join(STORAGE) + f" tracking.tracking_uri={MLFLOW}")
    pod = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == "2"
    # per GPU a Train worker + data reads, + drivers
    assert int(pod["resources"]["limits"]["cpu"]) == sizing.pod_cpus >= 5
    assert sizing.max_trials >= 1


def test_sizing_follows_the_sweep(spec_cache):
    spec = spec_cache(ROOT / "sweeps" / "lvu_genre.yaml")  # train_lvu: 1 GPU worker of 8 CPUs per trial
    _, s = render(spec, IMAGE, workers=4, gpus_per_worker=2, mlflow_uri=MLFLOW, overrides=STORAGE)
    assert (s.pod_cpus, s.pod_gpus, s.trial_gpus, s.trial_cpus) == (19, 2, 1, 9)  # 2 x (8 + 1 data) + 1 drivers
    assert s.max_trials == 8  # by GPUs: 4 pods x 2; by CPUs: 4 x (19 - 1) // 9 = 8
    assert any("--max-concurrent-trials 8" in n for n in s.notes)
    job, _ = render(spec, IMAGE, workers=4, gpus_per_worker=2, mlflow_uri=MLFLOW, overrides=STORAGE)
    assert "--max-concurrent-trials 8" in job["spec"]["entrypoint"]  # Tune's own limit would see no GPU pod
    _, s = render(spec, IMAGE, workers=4, gpus_per_worker=2, cpus_per_worker=12, mlflow_uri=MLFLOW, overrides=STORAGE)
    assert s.pod_cpus == 12 and s.max_trials == 4  # CPUs bind: 4 x (12 - 1) // 9
    with pytest.raises(ConfigError, match="scaling.num_workers=4 GPU workers per trial but --workers 1 x "
                                          "--gpus-per-worker 2 GPUs in all: the trial could never start"):
        render(spec, IMAGE, workers=1, gpus_per_worker=2, mlflow_uri=MLFLOW,
               overrides=STORAGE + ["scaling.num_workers=4"])
    with pytest.raises(ConfigError, match="--cpus-per-worker=8: a Train worker needs scaling.cpus_per_worker=8 "
                                          "CPUs on one pod, plus 1 for its trial's data reads"):
        render(spec, IMAGE, workers=4, gpus_per_worker=1, cpus_per_worker=8, mlflow_uri=MLFLOW, overrides=STORAGE)


def test_render_refuses_what_a_cluster_cannot_run(spec_cache, tmp_path):
    spec = spec_cache(ROOT / "sweeps" / "demo.yaml")
    ok = {"image": IMAGE, "workers": 1, "gpus_per_worker": 1, "mlflow_uri": MLFLOW, "overrides": STORAGE}

    def refused(match: str, **kw):
        with pytest.raises(ConfigError, match=match) as e:
            render_rayjob(spec, **{**ok, **kw})
        return str(e.value)

    refused(r"data.uri='data/synthetic_order': expected an object-store URI", overrides=STORAGE[1:])
    refused(r"run.storage_path='./results': expected an object-store URI", overrides=STORAGE[:1])
    refused("no MLflow server: pass --mlflow-uri", mlflow_uri=None)
    msg = refused("without credentials", mlflow_uri="http://admin:hunter2@mlflow:5000")
    assert "hunter2" not in msg
    refused("without credentials", mlflow_uri="http://mlflow:5000/?token=abc")
    refused("disagree", overrides=STORAGE + ["tracking.tracking_uri=http://other:5000"])
    refused("two shells", overrides=STORAGE + ["train.epochs=3;reboot"])
    refused("two shells", overrides=STORAGE + ["run.name=$(id)"])
    refused("--image", image="Not An Image")
    refused("--namespace", namespace="Bad_NS")
    refused("--memory='64GB': expected a Kubernetes quantity", memory="64GB")
    refused(r"optim.lr=-1.0: expected > 0", overrides=STORAGE + ["optim.lr=-1"])  # every trial's config is checked
    outside = tmp_path / "mine.yaml"
    outside.write_text(yaml.safe_dump({"name": "mine", "base": str(ROOT / "sweeps" / "train_synthetic.yaml"),
                                       "search_space": {"optim.lr": {"grid": [1e-3]}}}))
    with pytest.raises(ConfigError, match="outside the project"):
        render_rayjob(load_sweep(str(outside)), **ok)
    # tracking off: no MLflow needed, none in the manifest
    job = render_rayjob(spec, **{**ok, "mlflow_uri": None, "overrides": STORAGE + ["tracking.enabled=false"]})
    validate_manifest(job)
    assert "tracking.tracking_uri" not in job["spec"]["entrypoint"]


def test_entrypoint_is_a_vis4mer_sweep_command(spec_cache):
    """The entrypoint, split as a shell would, parses with vis4mer's own CLI (run and resume)."""
    import shlex

    from vis4mer.orchestrator.cli import build_parser

    spec = spec_cache(ROOT / "sweeps" / "demo.yaml")
    extra = STORAGE + ["data.eval_splits=[val,test]"]
    for resume in (False, True):
        job = render_rayjob(spec, IMAGE, workers=1, gpus_per_worker=1, mlflow_uri=MLFLOW,
                            overrides=extra + ["train.epochs=2"], resume=resume)
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[0] == "vis4mer"
        a = build_parser().parse_args(words[1:])
        assert a.command == "sweep" and a.resume is resume and a.max_concurrent_trials == 1
        assert a.overrides == extra + ["train.epochs=2", f"tracking.tracking_uri={MLFLOW}"]
        path = a.resume_file if resume else a.sweep
        assert path == "/home/ray/vis4mer/sweeps/demo.yaml" and (not resume or a.sweep == "demo")


def test_names():
    assert k8s_name("lvu_like_ratio") == "vis4mer-lvu-like-ratio"
    long = k8s_name("A_very_long_sweep_name_" * 4)
    assert len(long) <= 47 and long[0].isalpha() and not long.endswith("-")


# ------------------------------------------------------------------------------------------ validate


@pytest.fixture(scope="module")
def good_job(spec_cache):
    return render_rayjob(spec_cache(ROOT / "sweeps" / "demo.yaml"), IMAGE, workers=2, gpus_per_worker=1,
                         mlflow_uri=MLFLOW, overrides=STORAGE)


def _rc(job):
    return job["spec"]["rayClusterSpec"]


def _worker(job):
    return _rc(job)["workerGroupSpecs"][0]


def _worker_container(job):
    return _worker(job)["template"]["spec"]["containers"][0]


BROKEN = {
    "replicas as a list": (lambda j: _worker(j).__setitem__("replicas", [1, 2]),
                           "spec.rayClusterSpec.workerGroupSpecs[0].replicas: expected an integer, got list"),
    "unknown upscalingMode": (lambda j: _rc(j)["autoscalerOptions"].__setitem__("upscalingMode", "Fast"),
                              "spec.rayClusterSpec.autoscalerOptions.upscalingMode: 'Fast' is not one of"),
    "missing headGroupSpec": (lambda j: _rc(j).pop("headGroupSpec"),
                              "spec.rayClusterSpec.headGroupSpec: required field missing"),
    "misspelt field": (lambda j: _worker_container(j).__setitem__("resoures", {}),
                       "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resoures: unknown field"),
    "bad quantity": (lambda j: _worker_container(j)["resources"]["limits"].__setitem__("memory", "64GB"),
                     "containers[0].resources.limits.memory: '64GB' is not a Kubernetes quantity"),
    "container without name": (lambda j: _worker_container(j).pop("name"),
                               "containers[0].name: required field missing"),
    "ttl as a string": (lambda j: j["spec"].__setitem__("ttlSecondsAfterFinished", "600"),
                        "spec.ttlSecondsAfterFinished: expected an integer, got str"),
    "ttl without shutdown": (lambda j: j["spec"].__setitem__("shutdownAfterJobFinishes", False),
                             "spec.ttlSecondsAfterFinished: needs spec.shutdownAfterJobFinishes: true"),
    "literal secret": (lambda j: _worker_container(j)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}),
                       "containers[0].env[4].value: AWS_SECRET_ACCESS_KEY has a literal value"),
    "autoscaler v2 twice": (lambda j: _rc(j)["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "RAY_enable_autoscaler_v2", "value": "1"}), "keep only autoscalerOptions.version"),
    "restartPolicy with v2": (lambda j: _worker(j)["template"]["spec"].__setitem__("restartPolicy", "Always"),
                              "workerGroupSpecs[0].template.spec.restartPolicy: 'Always': expected Never"),
    "min above max": (lambda j: _worker(j).update(minReplicas=3, replicas=3),
                      "workerGroupSpecs[0].minReplicas: 3 > maxReplicas 2"),
    "name with underscore": (lambda j: j["metadata"].__setitem__("name", "vis4mer_demo"),
                             "metadata.name: 'vis4mer_demo': expected a DNS-1035 label"),
    "name too long": (lambda j: j["metadata"].__setitem__("name", "v" * 48), "of at most 47 characters"),
    "wrong apiVersion": (lambda j: j.__setitem__("apiVersion", "ray.io/v1alpha1"), "apiVersion: expected 'ray.io/v1'"),
    "negative backoff": (lambda j: j["spec"]["submitterConfig"].__setitem__("backoffLimit", -1),
                         "spec.submitterConfig.backoffLimit: -1: expected >= 0"),
    "token auth without rayVersion": (lambda j: _rc(j).pop("rayVersion"), "spec.rayClusterSpec.rayVersion: required"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_manifest_is_refused_naming_the_path(good_job, case):
    mutate, expected = BROKEN[case]
    job = copy.deepcopy(good_job)
    mutate(job)
    with pytest.raises(ConfigError) as e:
        validate_manifest(job, where="job.yaml")
    msg = str(e.value)
    assert msg.startswith("job.yaml: ") and expected in msg and "\n" not in msg


def test_broken_raycluster_is_refused():
    cluster = load_manifests(str(DEPLOY / "raycluster.yaml"))[0]
    cluster["spec"]["workerGroupSpecs"][0].pop("groupName")
    with pytest.raises(ConfigError, match=r"spec.workerGroupSpecs\[0\].groupName: required field missing"):
        validate_manifest(cluster)


def test_crds_folder_override(good_job, tmp_path, monkeypatch):
    monkeypatch.setenv("VIS4MER_KUBERAY_CRDS", str(tmp_path))
    with pytest.raises(ConfigError, match="VIS4MER_KUBERAY_CRDS"):
        validate_manifest(good_job)
    for name in ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml"):
        (tmp_path / name).write_text((ROOT.parent / "shared" / "kuberay-crds" / name).read_text())
    validate_manifest(good_job)


# ------------------------------------------------------------------------------------------ CLI


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": SECRET_SENTINEL, "MLFLOW_TRACKING_TOKEN": SECRET_SENTINEL}
    return subprocess.run([*VIS4MER, "k8s", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def test_cli_render_end_to_end(tmp_path):
    out = tmp_path / "job.yaml"
    p = _cli("render", "sweeps/lvu_genre.yaml", *STORAGE, "--image", IMAGE, "--workers", "4",
             "--gpus-per-worker", "1", "--mlflow-uri", MLFLOW, "--secret", "lvu-creds", "--out", str(out))
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert text.startswith("# RayJob for sweep 'lvu_genre', rendered by: vis4mer k8s render sweeps/lvu_genre.yaml")
    assert f"kubectl apply -f {out}" in text
    assert SECRET_SENTINEL not in text + p.stdout + p.stderr
    (job,) = load_manifests(str(out))
    validate_manifest(job)
    check_rayjob(job, secret="lvu-creds", workers=4)
    assert "max_concurrent_trials" in p.stderr  # the sizing note
    v = _cli("validate", str(out), "deploy/kuberay/rayjob.yaml", "deploy/kuberay/raycluster.yaml")
    assert v.returncode == 0, v.stderr
    assert v.stdout.splitlines() == [f"ok: {out}: RayJob vis4mer-lvu-genre",
                                     "ok: deploy/kuberay/rayjob.yaml: RayJob vis4mer-lvu-genre",
                                     "ok: deploy/kuberay/raycluster.yaml: RayCluster vis4mer"]


def test_cli_render_to_stdout():
    p = _cli("render", "sweeps/demo.yaml", *STORAGE, "--image", IMAGE, "--workers", "2", "--gpus-per-worker", "1",
             "--mlflow-uri", MLFLOW)
    assert p.returncode == 0, p.stderr
    job = yaml.safe_load(p.stdout)
    validate_manifest(job)
    assert "scaling.use_gpu=false" in p.stderr


@pytest.mark.parametrize("args, message", [
    (["sweeps/lvu_genre.yaml", "--workers", "0"], "argument --workers: 0 is not a positive integer"),
    (["sweeps/no_such_sweep.yaml", "--workers", "1"], "sweeps/no_such_sweep.yaml: no such sweep file"),
    (["sweeps/lvu_genre.yaml", "--workers", "1"], "data.uri='data/lvu/genre': expected an object-store URI"),
    (["sweeps/lvu_genre.yaml", *STORAGE, "--workers", "1", "--name", "Bad_Name"],
     "rendered RayJob: metadata.name: 'Bad_Name': expected a DNS-1035 label"),
])
def test_cli_render_errors_exit_2_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "job.yaml"
    p = _cli("render", *args, "--image", IMAGE, "--gpus-per-worker", "1", "--mlflow-uri", MLFLOW, "--out", str(out))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], p.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_validate_refuses_a_broken_file(tmp_path):
    doc = load_manifests(str(DEPLOY / "rayjob.yaml"))[0]
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = [1]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    p = _cli("validate", str(bad))
    assert p.returncode == 2
    assert p.stderr.strip() == (f"vis4mer k8s: error: {bad}: spec.rayClusterSpec.workerGroupSpecs[0].replicas: "
                                "expected an integer, got list [1]")
