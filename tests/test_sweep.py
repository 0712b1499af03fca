"""Sweeps on Ray Tune: shipped definitions validate; ASHA stops a trial and later trials still run;
MLflow gets one parent run and one child run per trial."""
from __future__ import annotations

import glob
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError
from orchestrator.sweep import discrete_overrides, load_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "sweeps" / "*.yaml"))))
def test_every_shipped_yaml_validates(path):
    text = Path(path).read_text()
    first = text.splitlines()[0]
    if Path(path).name.startswith("train_"):
        assert first.startswith("# vis4mer train ")
        return
    assert first.startswith("# vis4mer sweep "), "the launch command comes first"
    spec = load_sweep(path)
    assert discrete_overrides(spec)


def test_demo_sweep_covers_state_size_pooling_and_depth():
    spec = load_sweep(str(ROOT / "sweeps" / "demo.yaml"))
    keys = {o.split("=")[0] for combo in discrete_overrides(spec) for o in combo}
    assert {"model.d_state", "model.n_layers", "model.pool"} <= keys
    assert len(discrete_overrides(spec)) * 1 >= 2 and spec.budget["num_samples"] * 2 >= 8  # >= 8 trials


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(search_space={"optim.lr": {"gaussian": [0, 1]}}), "search_space.optim.lr: expected one of"),
    (lambda d: d.update(search_space={"optim.lr": {"loguniform": [0, 1]}}), "loguniform: expected low > 0"),
    (lambda d: d.update(scheduler={"kind": "pbt"}), "scheduler.kind 'pbt': expected asha or fifo"),
    (lambda d: d.update(budget={"num_samples": 0}), r"budget.num_samples=0: expected an integer >= 1"),
    (lambda d: d.update(search_space={"model": {"choice": [{"n_layers": 2, "pool": [2]}]}}),
     "trial with model.n_layers=2 model.pool=\\[2\\].*model.pool has 1 entries but model.n_layers=2"),
    (lambda d: d.update(colour="blue"), "unknown key 'colour'"),
])
def test_bad_sweeps_are_refused(tmp_path, mutate, match):
    d = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    d["base"] = str(ROOT / "sweeps" / "train_synthetic.yaml")
    mutate(d)
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=match):
        load_sweep(str(p))


@pytest.mark.ray
def test_asha_stops_a_trial_and_later_trials_run(synthetic_dataset, tmp_path, ray_session):
    import mlflow

    from orchestrator.sweep import run_sweep

    d = {"name": "asha", "base": str(ROOT / "sweeps" / "train_synthetic.yaml"),
         "overrides": {"data.uri": synthetic_dataset, "run.storage_path": str(tmp_path / "runs"),
                       "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "tracking.experiment": "asha",
                       "model.d_model": 16, "model.n_layers": 2, "model.d_state": 8, "data.batch_size": 4,
                       "train.epochs": 4, "schedule.kind": "constant", "train.checkpoint_every": 1},
         "search_space": {"optim.lr": {"grid": [3e-2, 1e-7, 1e-7, 3e-2]}},
         "metric": "train_loss",
         "scheduler": {"kind": "asha", "grace_period": 2, "reduction_factor": 2},
         "budget": {"num_samples": 1, "max_concurrent_trials": 1}}
    p = tmp_path / "asha.yaml"
    p.write_text(yaml.safe_dump(d))
    grid, parent = run_sweep(load_sweep(str(p)), progress=False)
    iters = [r.metrics["training_iteration"] for r in grid]
    assert len(iters) == 4 and not any(r.error for r in grid)
    assert min(iters) < 4 and max(iters) == 4  # ASHA stopped one; the trial after it still ran
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("asha").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(children) == 4 and len(runs) == 5
    assert len({r.data.tags["vis4mer.trial_id"] for r in children}) == 4

    # vis4mer best: MLflow only; the trial with the lowest train_loss, its config as a training YAML
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "best", "--sweep", "asha", "--experiment", "asha",
                          "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--top", "4", "--out", str(tmp_path / "best.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    losses = {r.data.tags["vis4mer.trial_id"]: r.data.metrics["train_loss"] for r in children}
    best_id = min(losses, key=losses.get)
    table = [l for l in out.stdout.splitlines() if l.strip().startswith("1 ")]
    assert table and best_id in table[0]
    from orchestrator.config import load_config
    best_cfg = load_config(str(tmp_path / "best.yaml"))
    assert best_cfg.optim.lr == pytest.approx(next(r for r in grid if r.metrics["trial_id"] == best_id).config["optim.lr"])
