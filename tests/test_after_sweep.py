"""After the sweep: a budget that ends it, `evaluate`, `promote` and `predict`, `best --group-seeds`.

One small sweep (three seeds of one configuration, one trial at a time) on the session's Ray, run
in this process through the CLI, with a sweep CPU-hour budget so small that the first trial's first
report reaches it: Tune ends the sweep, the reason is printed and tagged on the parent run. The
trial that ran is then evaluated on the test split (checked against a plain loop written here),
promoted to the registry (twice: one version), and predicted through its alias, which must
reproduce the evaluated accuracy exactly.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.support.cli import assert_contract, files_under, run_main
from tests.support.runs import SYNTHETIC_YAML

pytestmark = pytest.mark.ray
SWEEP = "after"


@pytest.fixture(scope="module")
def swept(synthetic_dataset, tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("after_sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"
    spec = {"name": SWEEP, "base": SYNTHETIC_YAML,
            "overrides": {"data.uri": synthetic_dataset, "run.storage_path": str(tmp / "runs"),
                          "tracking.tracking_uri": uri, "tracking.experiment": SWEEP, "model.d_model": 16,
                          "model.n_layers": 2, "model.d_state": 8, "model.dropout": 0.0, "data.batch_size": 16,
                          "data.eval_batch_size": 16, "train.epochs": 2, "schedule.kind": "constant",
                          "optim.lr": 0.01, "train.checkpoint_every": 1, "data.cache": "memory"},
            "search_space": {"train.seed": {"grid": [1, 2, 3]}},
            "scheduler": {"kind": "fifo"},
            # 1e-9 CPU-hours: reached at the first report; cost at 2.5 per CPU-hour
            "budget": {"num_samples": 1, "max_concurrent_trials": 1, "max_sweep_cpu_hours": 1e-9,
                       "price_per_cpu_hour": 2.5}}
    path = tmp / "after.yaml"
    path.write_text(yaml.safe_dump(spec))
    gcs = ray_session.get_runtime_context().gcs_address
    r = run_main(["sweep", str(path), "--address", gcs], tmp)
    assert r.code == 0, r.err[-3000:]
    return {"tmp": tmp, "uri": uri, "sweep_out": r.out, "data": synthetic_dataset, "gcs": gcs}


def _runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(SWEEP)
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


def test_a_budget_ends_the_sweep_and_says_why_and_trials_log_their_spend(swept):
    client, parent, children = _runs(swept["uri"])
    reason = parent.data.tags.get("vis4mer.stop_reason", "")
    assert reason.startswith("budget.max_sweep_cpu_hours=1e-09 reached"), parent.data.tags
    assert f"stopped at its budget: {reason}" in swept["sweep_out"]
    ran = [r for r in children if "val_top1" in r.data.metrics]
    assert len(ran) == 1, [r.data.tags.get("vis4mer.trial_id") for r in children]  # the other two never started
    m = ran[0].data.metrics
    assert m["cpu_hours"] > 0 and m["gpu_hours"] == 0 and m["cost"] == pytest.approx(2.5 * m["cpu_hours"])
    # vis4mer best shows them; a price on the command line re-estimates the cost
    r = run_main(["best", "--sweep", SWEEP, "--tracking-uri", swept["uri"], "--out", str(swept["tmp"] / "b.yaml"),
                  "--price-per-cpu-hour", "10"], swept["tmp"])
    assert r.code == 0, r.err
    header, row = r.out.splitlines()[1:3]
    assert "cpu_h" in header and "cost" in header
    cells = row.split()
    assert float(cells[5]) == pytest.approx(m["cpu_hours"], rel=1e-3)
    assert float(cells[7]) == pytest.approx(10 * m["cpu_hours"], rel=1e-3)


def _independent_accuracy(swept, run) -> tuple[float, dict]:
    """The best checkpoint on the test split by a plain loop: each video read with pyarrow + numpy,
    zero-padded to one window (these videos are shorter than the task's window), softmax, argmax."""
    from vis4mer.datasets.format import open_dataset
    from vis4mer.model import ViS4mer
    from vis4mer.orchestrator.train.config import load_config, model_config

    ds = open_dataset(swept["data"])
    best = swept["tmp"] / "runs" / run.data.tags["mlflow.runName"] / "best"
    state = torch.load(best / "state.pt", map_location="cpu", weights_only=True)
    model = ViS4mer(model_config(load_config(str(best / "config.yaml")).model, ds.task))
    model.load_state_dict(state["model"])
    model.eval()
    task, preds, labels = ds.task, {}, {}
    for shard in ds.shard_paths("test"):
        t = pq.read_table(shard, columns=["video_id", "label", "num_frames", "features"])
        for i in range(t.num_rows):
            n = t["num_frames"][i].as_py()
            x = np.frombuffer(t["features"][i].as_buffer(), "<f2").reshape(n, task.tokens_per_frame, -1)
            window = np.zeros((task.window_frames, *x.shape[1:]), np.float32)
            window[:n] = x
            with torch.no_grad():
                out = model(torch.from_numpy(window.reshape(1, -1, x.shape[-1])))
            vid = t["video_id"][i].as_py()
            preds[vid], labels[vid] = int(out.argmax()), t["label"][i].as_py()
    return float(np.mean([preds[v] == labels[v] for v in preds])), preds


@pytest.fixture(scope="module")
def evaluated(swept):
    r = run_main(["evaluate", "--sweep", SWEEP, "--split", "test", "--tracking-uri", swept["uri"],
                  "--address", swept["gcs"]], swept["tmp"])
    assert r.code == 0, r.err[-3000:]
    printed = dict(line.split() for line in r.out.splitlines()[1:])
    return {k: float(v) for k, v in printed.items()}


def test_evaluate_logs_test_metrics_to_the_trial_and_the_best_to_the_sweep(swept, evaluated):
    client, parent, children = _runs(swept["uri"])
    run = next(r for r in children if "val_top1" in r.data.metrics)
    assert set(evaluated) == {"test_top1", "test_loss"}
    assert run.data.metrics["test_top1"] == evaluated["test_top1"]
    assert math.isfinite(run.data.metrics["test_loss"]) and run.data.metrics["test_loss"] > 0
    assert parent.data.metrics["best_test_top1"] == evaluated["test_top1"]
    expected, _ = _independent_accuracy(swept, run)
    assert evaluated["test_top1"] == pytest.approx(expected, abs=1e-12)


def test_promote_registers_one_version_with_its_alias_and_tags_and_predict_reproduces_the_accuracy(swept, evaluated):
    from mlflow.tracking import MlflowClient

    argv = ["promote", "--sweep", SWEEP, "--model-name", "vis4mer-after", "--alias", "champion",
            "--tracking-uri", swept["uri"]]
    first, again = run_main(argv, swept["tmp"]), run_main(argv, swept["tmp"])
    assert first.code == 0 and again.code == 0, first.err + again.err
    assert "registered vis4mer-after version 1" in first.out and "already registered as" in again.out
    client = MlflowClient(swept["uri"])
    versions = client.search_model_versions("name='vis4mer-after'")
    assert len(versions) == 1  # promoting the same trial again adds no version
    v = client.get_model_version_by_alias("vis4mer-after", "champion")
    _, parent, children = _runs(swept["uri"])
    run = next(r for r in children if "val_top1" in r.data.metrics)
    assert v.tags["vis4mer.source_run_id"] == run.info.run_id
    assert v.tags["vis4mer.sweep"] == SWEEP and v.tags["vis4mer.trial_id"] == run.data.tags["vis4mer.trial_id"]
    assert v.tags["vis4mer.dataset_manifest_sha256"] == run.data.tags["vis4mer.dataset_manifest_sha256"] != ""
    assert float(v.tags["vis4mer.test_top1"]) == evaluated["test_top1"]
    assert "model:" in v.tags["vis4mer.config"] and "data:" in v.tags["vis4mer.config"]
    from mlflow.models import get_model_info

    from vis4mer.datasets.format import open_dataset

    task = open_dataset(swept["data"]).task
    info = get_model_info(f"models:/vis4mer-after/{v.version}")
    assert json.loads(info.signature.inputs.to_json())[0]["tensor-spec"]["shape"] == \
        [-1, task.window_frames * task.tokens_per_frame, task.feature_dim]  # one example of the task

    out = swept["tmp"] / "preds.parquet"
    r = run_main(["predict", "--model", "models:/vis4mer-after@champion", "--data", swept["data"], "--split",
                  "test", "--out", str(out), "--tracking-uri", swept["uri"], "--address", swept["gcs"]], swept["tmp"])
    assert r.code == 0, r.err[-3000:]
    table = pq.read_table(out)
    assert table.column_names == ["video_id", "prediction", "scores"]
    _, expected = _independent_accuracy(swept, run)
    assert dict(zip(table["video_id"].to_pylist(), table["prediction"].to_pylist())) == expected
    ds = open_dataset(swept["data"])
    labels = {vid: y for s in ds.shard_paths("test")
              for vid, y in zip(*pq.read_table(s, columns=["video_id", "label"]).to_pydict().values())}
    accuracy = np.mean([p == labels[v] for v, p in zip(table["video_id"].to_pylist(), table["prediction"].to_pylist())])
    assert accuracy == evaluated["test_top1"]  # exactly the evaluated number
    scores = np.array(table["scores"].to_pylist())
    assert np.allclose(scores.sum(1), 1.0) and (scores.argmax(1) == np.array(table["prediction"])).all()


def _mismatched_dataset(root) -> str:
    from vis4mer.datasets.synthetic import write_synthetic

    uri = str(root / "dim4")
    write_synthetic(uri, videos=(2, 2, 2), frames=40, min_frames=32, tokens=2, dim=4, seed=1)
    return uri


def test_predict_refuses_data_the_model_does_not_fit_and_writes_nothing(swept):
    """Shape checked before any work; a failed predict leaves what --out held untouched."""
    other = _mismatched_dataset(swept["tmp"])
    out = swept["tmp"] / "kept.parquet"
    out.write_bytes(b"the user's file")
    before = files_under(swept["tmp"] / "runs")
    cases = {"shape": (["--data", other], "feature dim 4, but the model expects 8"),
             "split": (["--data", swept["data"], "--split", "nosuch"], "has no 'nosuch' split"),
             "alias": (["--model", "models:/vis4mer-after@nosuch", "--data", swept["data"]], "--model models:/"),
             "scheme": (["--model", "/tmp/model.pt", "--data", swept["data"]], "expected models:/NAME@ALIAS"),
             "both": (["--data", swept["data"], "--videos", str(swept["tmp"])], "expected one of --data")}
    for name, (extra, match) in cases.items():
        model = [] if "--model" in extra else ["--model", "runs:/0/none"]
        if name in ("shape", "split", "both"):
            model = ["--model", "models:/vis4mer-after@champion"]
        argv = ["predict", *model, *extra, "--out", str(out), "--tracking-uri", swept["uri"]]
        r = run_main(argv, swept["tmp"])
        assert r.code == 2 and match in r.err, (name, r.err)
        assert_contract(r, argv)
        assert out.read_bytes() == b"the user's file", name
    assert files_under(swept["tmp"] / "runs") == before
    assert not list(swept["tmp"].glob(".kept.parquet.*"))  # no temporary file left beside it


def test_evaluate_and_promote_refuse_unknown_trials_in_one_line(swept):
    for argv, match in ((["evaluate", "--run", "nosuch"], "run 'nosuch': not found"),
                        (["evaluate", "--sweep", "x", "--run", "y"], "expected one of --sweep"),
                        (["evaluate", "--sweep", SWEEP, "--split", "nosuch"], "has no 'nosuch' split"),
                        (["promote", "--sweep", "nosuch", "--model-name", "m"], "sweep 'nosuch': no parent run"),
                        (["promote", "--sweep", SWEEP, "--model-name", "bad name!"], "--model-name")):
        argv = [*argv, "--tracking-uri", swept["uri"]]
        r = run_main(argv, swept["tmp"])
        assert r.code == 2 and match in r.err, (argv, r.err)
        assert_contract(r, argv)


def test_predict_from_raw_videos_runs_the_encoder_stage_then_the_model(swept, tmp_path):
    """--videos: a folder of videos -> the built-in ViT (tiny, from a weights file) -> a model logged
    by run (runs:/...) -> predictions; checked against the encoder and the model run here directly.
    The encoder's shape is checked against the model before any work."""
    import mlflow
    import mlflow.pytorch

    from tests.test_extract import _reference, make_video, tiny_weights
    from vis4mer.datasets.tasks import get_task
    from vis4mer.model import ViS4mer, ViS4merConfig

    videos = tmp_path / "videos"
    videos.mkdir()
    make_video(videos / "a.mp4", 3, seed=1)
    make_video(videos / "b.mp4", 2, seed=2)
    weights = tiny_weights(tmp_path / "tiny.pth")
    task = get_task("lvu_genre", feature_dim=64)  # the tiny ViT's 197 tokens x 64 dims, 60-s windows
    torch.manual_seed(0)
    model = ViS4mer(ViS4merConfig(d_input=64, l_max=task.seq_len, d_model=8, n_layers=1, d_state=8,
                                  num_classes=task.num_classes)).eval()
    from mlflow.tracking import MlflowClient

    # no mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID to this whole test process
    exp_id = MlflowClient(swept["uri"]).create_experiment("raw-videos")
    mlflow.set_tracking_uri(swept["uri"])
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pip_requirements=[])
    out = tmp_path / "preds.parquet"
    base = ["predict", "--model", f"runs:/{run.info.run_id}/model", "--videos", str(videos), "--weights", weights,
            "--arch", "tiny", "--out", str(out), "--tracking-uri", swept["uri"], "--address", swept["gcs"]]

    r = run_main([*base, "--extractor", "swin"], tmp_path)  # Swin segments: another sequence length
    assert r.code == 2 and f"but the model expects {task.seq_len}" in r.err, r.err
    assert_contract(r, base)
    assert not out.exists()

    r = run_main([*base, "--extractor", "vit"], tmp_path)
    assert r.code == 0, r.err[-3000:]
    table = pq.read_table(out)
    assert sorted(table["video_id"].to_pylist()) == ["a", "b"]
    for vid, scores, pred in zip(table["video_id"].to_pylist(), table["scores"].to_pylist(),
                                 table["prediction"].to_pylist()):
        x = torch.from_numpy(_reference({"weights": weights}, videos / f"{vid}.mp4")).float()  # (seconds, 197, 64)
        window = torch.zeros(task.window_frames, *x.shape[1:])
        window[: len(x)] = x.half().float()  # features are stored as float16
        with torch.no_grad():
            expected = torch.softmax(model(window.reshape(1, -1, 64)), -1)[0]
        assert np.allclose(scores, expected.numpy(), atol=1e-4), (vid, scores, expected)
        assert pred == int(np.argmax(scores))
