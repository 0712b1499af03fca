"""Sweeps on Ray Tune: shipped definitions validate; ASHA stops a trial and later trials still run;
MLflow gets one parent run and one child run per trial."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support.runs import ROOT, VIS4MER
from vis4mer.orchestrator.sweep.spec import discrete_overrides, load_sweep
from vis4mer.orchestrator.train.config import ConfigError, load_config

SWEEPS = [p for p in sorted(glob.glob(str(ROOT / "sweeps" / "*.yaml"))) if not Path(p).name.startswith("train_")]


@pytest.mark.parametrize("path", SWEEPS)
def test_every_shipped_sweep_validates(path):
    """(The training configs, sweeps/train_*.yaml: test_training.py.)"""
    first = Path(path).read_text().splitlines()[0]
    assert first.startswith("# vis4mer sweep "), "the launch command comes first"
    spec = load_sweep(path)
    assert discrete_overrides(spec)


def test_demo_sweep_covers_state_size_pooling_and_depth():
    spec = load_sweep(str(ROOT / "sweeps" / "demo.yaml"))
    keys = {o.split("=")[0] for combo in discrete_overrides(spec) for o in combo}
    assert {"model.d_state", "model.n_layers", "model.pool"} <= keys
    from vis4mer.orchestrator.sweep.spec import trial_count

    assert trial_count(spec) >= 8 and spec.scheduler["kind"] == "asha"
    assert any("model.n_layers=0" in combo for combo in discrete_overrides(spec))  # the mean-pooled baseline


def test_an_override_of_a_searched_key_fixes_it():
    from vis4mer.orchestrator.sweep.spec import trial_count
    from vis4mer.orchestrator.train.config import ConfigError

    demo = str(ROOT / "sweeps" / "demo.yaml")
    full = load_sweep(demo)
    spec = load_sweep(demo, ["model.d_state=16", "train.epochs=3"])
    assert "model.d_state" not in spec.search_space and spec.overrides["model.d_state"] == 16
    assert trial_count(spec) == trial_count(full) // 2
    assert all("model.d_state=16" in spec.base_overrides(c) for c in discrete_overrides(spec))
    with pytest.raises(ConfigError, match="fix every searched key: nothing left to sweep"):
        load_sweep(demo, ["model.d_state=16", "model={n_layers: 0}", "optim.lr=0.003"])


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(search_space={"optim.lr": {"gaussian": [0, 1]}}), "search_space.optim.lr: expected one of"),
    (lambda d: d.update(search_space={"optim.lr": {"loguniform": [0, 1]}}), "loguniform: expected low > 0"),
    (lambda d: d.update(scheduler={"kind": "pbt"}), "scheduler.kind 'pbt': expected asha or fifo"),
    (lambda d: d.update(budget={"num_samples": 0}), r"budget.num_samples=0: expected an integer from 1 to"),
    (lambda d: d.update(search_space={"model": {"choice": [{"n_layers": 2, "pool": [2]}]}}),
     "trial with model.n_layers=2 model.pool=\\[2\\].*model.pool has 1 entries but model.n_layers=2"),
    (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
    (lambda d: d["budget"].update(max_sweep_gpu_hours=0), r"max_sweep_gpu_hours=0: expected a finite number > 0"),
    (lambda d: d["budget"].update(max_trial_hours="1h"), r"budget.max_trial_hours='1h': expected a finite number"),
    (lambda d: d["budget"].update(price_per_cpu_hour=-1), r"budget.price_per_cpu_hour=-1: expected .* >= 0"),
    (lambda d: d["budget"].update(max_sweep_cpu_hours=float("inf")), r"max_sweep_cpu_hours=inf: expected a finite"),
])
def test_bad_sweeps_are_refused(tmp_path, mutate, match):
    d = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    d["base"] = str(ROOT / "sweeps" / "train_synthetic.yaml")
    mutate(d)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=match):
        load_sweep(str(p))


SHAPES = {"lvu": "lvu_relationship", "breakfast": "breakfast", "coin": "coin"}


@pytest.mark.parametrize("path", [p for p in sorted(glob.glob(str(ROOT / "sweeps" / "*.yaml")))
                                  if Path(p).stem.split("_")[0] in SHAPES])
def test_shipped_benchmark_sweeps_fit_their_task(path):
    """Every trial of the LVU / Breakfast / COIN sweeps builds a valid model at the task's length."""
    from vis4mer.datasets.tasks import get_task
    from vis4mer.orchestrator.train.config import model_config

    spec = load_sweep(path)
    name = Path(path).stem
    task = get_task(name if name in ("breakfast", "coin") else name)
    base = load_config(spec.base)
    assert base.optim.lr == 1e-3 and base.optim.weight_decay == 0.01 and base.model.dropout == 0.2
    assert base.train.seed == 1112 and base.data.batch_size == 16  # the released recipe
    for overrides in discrete_overrides(spec):
        model_config(load_config(spec.base, spec.base_overrides(overrides)).model, task).validate()
    assert {"model.d_state", "model.n_layers", "model.pool", "train.seed"} <= {
        o.split("=")[0] for combo in discrete_overrides(spec) for o in combo}


def _children(uri: str, experiment: str):
    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return client, [r for r in runs if "mlflow.parentRunId" in r.data.tags], runs


@pytest.mark.ray
def test_sweep_lifecycle_asha_kill_resume_best_report(synthetic_dataset, tmp_path, ray_session):
    """One 3-trial ASHA sweep, driven by `vis4mer sweep` in its own process on the session's Ray:
    the driver is killed once two trials have ended, `--resume` completes the sweep without rerunning
    them and without duplicate child runs; ASHA stopped a trial and a later one still ran; progress
    lines count stopped trials; `best` and `report` read MLflow."""
    import ray

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    d = {"name": "asha", "base": str(ROOT / "sweeps" / "train_synthetic.yaml"),
         "overrides": {"data.uri": synthetic_dataset, "run.storage_path": str(tmp_path / "runs"),
                       "tracking.tracking_uri": uri, "tracking.experiment": "asha",
                       "model.d_model": 16, "model.n_layers": 2, "model.d_state": 8, "data.batch_size": 4,
                       "train.epochs": 4, "schedule.kind": "constant", "train.checkpoint_every": 1,
                       "data.cache": "memory"},
         "search_space": {"optim.lr": {"grid": [3e-2, 5.0, 3e-2]}},  # 5.0: a loss that blows up
         "metric": "train_loss",
         "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
         "budget": {"num_samples": 1, "max_concurrent_trials": 1}}
    p = tmp_path / "asha.yaml"
    p.write_text(yaml.safe_dump(d))
    gcs = ray.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen(VIS4MER + ["sweep", str(p), "--address", gcs], stdout=log, stderr=subprocess.STDOUT,
                              cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            if len(_children(uri, "asha")[1]) >= 3:  # trials run one at a time: two have ended
                break
            time.sleep(1)
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        time.sleep(4)  # past Tune's state-save period (2 s): the two ended trials are on record
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    client, before, _ = _children(uri, "asha")
    ended = {r.info.run_id: [(m.step, m.timestamp) for m in client.get_metric_history(r.info.run_id, "train_loss")]
             for r in before if r.info.status != "RUNNING" or r.data.tags.get("vis4mer.stopped_early")}
    assert len(ended) >= 2, [(r.info.status, r.data.tags.get("vis4mer.stopped_early")) for r in before]

    out = subprocess.run(VIS4MER + ["sweep", "--resume", "asha", "--resume-file", str(p), "--address", gcs],
                         capture_output=True, text=True, timeout=420, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, children, runs = _children(uri, "asha")
    assert len(children) == 3 and len(runs) == 4  # no duplicate child runs
    assert len({r.data.tags["vis4mer.trial_id"] for r in children}) == 3
    epochs = {}
    for r in children:
        hist = [(m.step, m.timestamp) for m in client.get_metric_history(r.info.run_id, "train_loss")]
        assert len({s for s, _ in hist}) == len(hist), "an epoch was logged twice"
        if r.info.run_id in ended:
            assert hist == ended[r.info.run_id], "a trial that had ended ran again"
        assert r.info.status == "FINISHED", (r.data.tags.get("vis4mer.trial_id"), r.info.status, len(hist),
                                             r.data.tags.get("vis4mer.stopped_early"), r.data.tags.get("vis4mer.error"))
        epochs[r.info.run_id] = (r.info.start_time, len(hist), r.data.tags.get("vis4mer.stopped_early"))
    order = sorted(epochs.values())
    # ASHA stopped one (its decision is recorded on the child run; the stop is asynchronous, so on
    # these sub-second epochs its workers may still log an epoch or two before they are torn down) ...
    first_stop = next(i for i, (_, _, stopped) in enumerate(order) if stopped == "true")
    assert any(n == 4 for _, n, _ in order[first_stop + 1:])  # ... and a later trial still ran to the end
    progress = [ln for ln in out.stdout.splitlines() if ln.startswith("[asha ")]
    assert progress and re.search(r"0 running, \d finished, [1-9] stopped, 0 errored, 0 pending", progress[-1])
    assert "best trials by train_loss (min)" in out.stdout and "plot: " in out.stdout

    # vis4mer best: MLflow only; the trial with the lowest train_loss, its config as a training YAML
    out = subprocess.run(VIS4MER + ["best", "--sweep", "asha", "--tracking-uri", uri, "--top", "4",
                                    "--out", str(tmp_path / "best.yaml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    losses = {r.data.tags["vis4mer.trial_id"]: r.data.metrics["train_loss"] for r in children}
    best_id = min(losses, key=losses.get)
    table = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("1 ")]
    assert table and best_id in table[0]
    best_run = next(r for r in children if r.data.tags["vis4mer.trial_id"] == best_id)
    assert load_config(str(tmp_path / "best.yaml")).optim.lr == pytest.approx(float(best_run.data.params["optim.lr"]))

    # vis4mer report: two PNGs, saved locally and logged to the parent run
    out = subprocess.run(VIS4MER + ["report", "asha", "--tracking-uri", uri, "--out", str(tmp_path / "plots")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    import matplotlib.image

    for name in ("asha_final_metric.png", "asha_learning_curves.png"):
        img = matplotlib.image.imread(tmp_path / "plots" / name)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 0.01  # a drawn figure, not blank
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    logged = {os.path.basename(a.path) for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"asha_final_metric.png", "asha_learning_curves.png", "trials.json"} <= logged


def test_report_and_best_refuse_unknown_sweeps_and_stores_in_one_line(tmp_path):
    import mlflow

    store = f"sqlite:///{tmp_path}/m.db"
    mlflow.tracking.MlflowClient(store).search_experiments()  # an existing, empty store
    for args, match in ((["report", "nosuch", "--tracking-uri", store], "sweep 'nosuch': no parent run"),
                        (["best", "--sweep", "nosuch", "--tracking-uri", store], "sweep 'nosuch': no parent run"),
                        (["report", "x", "--tracking-uri", f"sqlite:///{tmp_path}/absent.db"],
                         "no MLflow store there")):
        out = subprocess.run(VIS4MER + args, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and match in out.stderr, out.stderr
    assert not (tmp_path / "absent.db").exists()  # reading never creates a store


def test_a_sweep_run_again_is_a_new_sweep_and_best_and_report_read_the_latest(tmp_path):
    """A fresh run of a sweep gets a new parent run (Tune starts a new experiment too); --resume
    finds the latest parent again; `best --sweep` and `report` rank only the latest sweep's trials."""
    from mlflow.tracking import MlflowClient

    from vis4mer.orchestrator.sweep.best import best_trials
    from vis4mer.orchestrator.sweep.lookup import sweep_runs
    from vis4mer.orchestrator.train import tracking
    from vis4mer.orchestrator.train.config import load_config

    store = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(str(ROOT / "sweeps" / "train_synthetic.yaml"),
                      [f"tracking.tracking_uri={store}", "tracking.experiment=again"])
    client = MlflowClient(store)
    tags = {"vis4mer.sweep": "again", "vis4mer.metric": "val_top1"}
    parents = []
    for trial, value in (("first_00000", 0.9), ("second_00000", 0.6)):
        parent = tracking.get_or_create_parent(cfg, "again", tags, {"optim.lr": {"grid": [0.01]}})
        child = client.create_run(client.get_run(parent).info.experiment_id, tags={
            "mlflow.parentRunId": parent, "vis4mer.sweep": "again", "vis4mer.trial_id": trial})
        client.log_metric(child.info.run_id, "val_top1", value)
        parents.append(parent)
        time.sleep(0.05)  # start times in ms
    assert parents[0] != parents[1]
    assert tracking.get_or_create_parent(cfg, "again", tags, {}, resume=True) == parents[1]
    metric, mode, rows = best_trials(store, "again", "again", None)
    assert (metric, mode, [r.trial_id for r in rows]) == ("val_top1", "max", ["second_00000"])
    _, parent, children, _ = sweep_runs(store, "again", "again")
    assert parent.info.run_id == parents[1] and len(children) == 1


def test_best_groups_seeds_ranks_by_the_mean_and_report_draws_the_spread(tmp_path):
    """A search space with train.seed: `best` ranks configurations by their mean over seeds (not by
    their luckiest seed), shows mean +- std, the count and summed spend; --no-group-seeds ranks
    trials; `report` adds the spread plot."""
    import statistics

    from mlflow.tracking import MlflowClient

    from tests.support.cli import run_main
    from vis4mer.orchestrator.train import tracking

    store = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(str(ROOT / "sweeps" / "train_synthetic.yaml"),
                      [f"tracking.tracking_uri={store}", "tracking.experiment=seeds"])
    client = MlflowClient(store)
    parent = tracking.get_or_create_parent(cfg, "seeds", {"vis4mer.sweep": "seeds", "vis4mer.metric": "val_top1"},
                                           {"optim.lr": {"grid": [0.01, 0.1]}, "train.seed": {"grid": [1, 2, 3]}})
    exp = client.get_run(parent).info.experiment_id
    values = {0.01: [0.70, 0.72, 0.74], 0.1: [0.95, 0.40, 0.45]}  # lr 0.1 has the single best seed
    for i, (lr, seed) in enumerate((lr, s) for lr in values for s in (1, 2, 3)):
        child = client.create_run(exp, run_name=f"seeds-t{i}", tags={
            "mlflow.parentRunId": parent, "vis4mer.sweep": "seeds", "vis4mer.trial_id": f"t{i}",
            "vis4mer.params": json.dumps({"optim.lr": lr, "train.seed": seed})})
        for step, frac in enumerate((0.5, 1.0)):
            client.log_metric(child.info.run_id, "val_top1", values[lr][seed - 1] * frac, step=step + 1)
        client.log_text(child.info.run_id, f"optim:\n  lr: {lr}\ntrain:\n  seed: {seed}\n", "config.yaml")
        client.log_metric(child.info.run_id, "cpu_hours", 0.25)
        client.log_metric(child.info.run_id, "gpu_hours", 0.0)
    r = run_main(["best", "--sweep", "seeds", "--tracking-uri", store, "--out", str(tmp_path / "best.yaml")], tmp_path)
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0] == "best configurations by mean val_top1 over seeds (max):"
    first, second = lines[2].split(), lines[3].split()
    mean, std = statistics.fmean(values[0.01]), statistics.stdev(values[0.01])
    assert float(first[1]) == pytest.approx(mean, abs=1e-4) and float(first[3]) == pytest.approx(std, abs=1e-3)
    assert first[4] == "3" and float(first[5]) == pytest.approx(0.75) and '"optim.lr": 0.01' in lines[2]
    assert float(second[1]) == pytest.approx(statistics.fmean(values[0.1]), abs=1e-4)
    assert " t2 " in lines[2]  # the best seed of the best configuration is the winner written out
    assert "# best trial t2 " in (tmp_path / "best.yaml").read_text()

    r = run_main(["best", "--sweep", "seeds", "--tracking-uri", store, "--no-group-seeds", "--top", "1",
                  "--out", str(tmp_path / "b2.yaml")], tmp_path)
    assert r.code == 0 and "best trials by val_top1 (max)" in r.out and " t3 " in r.out.splitlines()[2], r.out

    r = run_main(["report", "seeds", "--tracking-uri", store, "--out", str(tmp_path / "plots")], tmp_path)
    assert r.code == 0, r.err
    import matplotlib.image

    img = matplotlib.image.imread(tmp_path / "plots" / "seeds_seeds.png")
    assert img.shape[0] > 200 and img.std() > 0.01
