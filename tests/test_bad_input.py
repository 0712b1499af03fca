"""The bad-input catalogue: configs, sweep YAMLs, shards and manifests, URIs, credentials and CLI
arguments. Each case is one `vis4mer` command line that must end with exactly one error line naming
the culprit (and what was expected), exit code 2, no traceback, and nothing half-written: no
output folder, no MLflow store, no run folder.

The cases run `vis4mer.orchestrator.cli.main` in-process (fast); test_cli_demo, test_training and test_jobs
check the same contract through real subprocesses."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.runs import SYNTHETIC_YAML as SYNTH
from vis4mer.orchestrator.cli import main


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
    from vis4mer.datasets.synthetic import write_synthetic

    uri = str(tmp_path_factory.mktemp("good") / "ds")
    write_synthetic(uri, videos=(8, 4, 4), frames=16, min_frames=12, tokens=2, dim=4, seed=0)
    return uri


def _broken_copy(good: str, where: Path, how: str) -> str:
    out = where / f"broken-{how}"
    shutil.copytree(good, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][0]["path"]
    if how == "flipped-bytes":  # same size, different content: only the hash can tell
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif how == "missing-shard":
        shard.unlink()
    elif how == "manifest-json":
        (out / "manifest.json").write_text("{not json")
    return str(out)


def _sweep(tmp_path: Path, **changes) -> str:
    d = {"name": "bad", "base": SYNTH, "search_space": {"optim.lr": {"grid": [1e-3]}}, "scheduler": {"kind": "fifo"}}
    d.update(changes)
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(d))
    return str(p)


# (id, argv builder (tmp_path, good dataset) -> argv, expected text in the error line)
CASES = [
    # --- training configs -------------------------------------------------------------------
    ("config-unknown-key", lambda t, g: ["train", SYNTH, "optim.lrr=1"], "unknown key 'optim.lrr'"),
    ("config-wrong-type", lambda t, g: ["train", SYNTH, "train.epochs=ten"], "train.epochs"),
    ("config-negative-lr", lambda t, g: ["train", SYNTH, "optim.lr=-1"], "optim.lr"),
    ("config-zero-workers", lambda t, g: ["train", SYNTH, "scaling.num_workers=0"], "scaling.num_workers"),
    ("config-bad-schedule", lambda t, g: ["train", SYNTH, "schedule.kind=exp"], "schedule.kind"),
    ("config-not-key-value", lambda t, g: ["train", SYNTH, "optim.lr"], "expected key=value"),
    ("config-missing-file", lambda t, g: ["train", str(t / "nope.yaml")], "no such config file"),
    ("config-not-yaml", lambda t, g: (t / "x.yaml").write_text("a: [1,\n") and ["train", str(t / "x.yaml")],
     "not valid YAML"),
    ("config-batch-too-big", lambda t, g: ["train", SYNTH, f"data.uri={g}", "data.batch_size=64",
                                           f"run.storage_path={t}/runs"], "data.batch_size=64"),
    # (wide enough that every stage's width halves: the dataset's sequence length is what runs out)
    ("config-schedule-too-deep", lambda t, g: ["train", SYNTH, f"data.uri={g}", "model.n_layers=9",
                                               "model.d_model=1024", f"run.storage_path={t}/runs"], "pooling length"),
    ("config-width-not-divisible", lambda t, g: ["train", SYNTH, "model.n_layers=9"],
     "model: stage 6: width 1 is not divisible by width_div 2"),
    # --- sweep YAMLs --------------------------------------------------------------------------
    ("sweep-unknown-kind", lambda t, g: ["sweep", _sweep(t, search_space={"optim.lr": {"gaussian": [0, 1]}})],
     "search_space.optim.lr: expected one of"),
    ("sweep-loguniform-zero", lambda t, g: ["sweep", _sweep(t, search_space={"optim.lr": {"loguniform": [0, 1]}})],
     "expected low > 0"),
    ("sweep-scheduler", lambda t, g: ["sweep", _sweep(t, scheduler={"kind": "pbt"})], "scheduler.kind 'pbt'"),
    ("sweep-num-samples", lambda t, g: ["sweep", _sweep(t, budget={"num_samples": 0})], "budget.num_samples=0"),
    ("sweep-max-failures", lambda t, g: ["sweep", _sweep(t, budget={"max_failures": -1})], "budget.max_failures=-1"),
    ("sweep-bad-trial", lambda t, g: ["sweep", _sweep(t, search_space={"model": {"choice": [{"n_layers": 2,
                                                                                         "pool": [2]}]}})],
     "model.pool has 1 entries but model.n_layers=2"),
    ("sweep-unknown-key", lambda t, g: ["sweep", _sweep(t, colour="blue")], "unknown key 'colour'"),
    ("sweep-missing-file", lambda t, g: ["sweep", str(t / "none.yaml")], "no such sweep file"),
    ("sweep-no-file", lambda t, g: ["sweep"], "expected SWEEP.yaml"),
    # --- shards and manifests -----------------------------------------------------------------
    ("data-no-manifest", lambda t, g: ["data", "verify", str(t)], "manifest.json"),
    ("data-hash-mismatch", lambda t, g: ["data", "verify", _broken_copy(g, t, "flipped-bytes")], "sha256"),
    ("data-missing-shard", lambda t, g: ["data", "verify", _broken_copy(g, t, "missing-shard")], "shard"),
    ("data-manifest-json", lambda t, g: ["data", "inspect", _broken_copy(g, t, "manifest-json")], "manifest"),
    ("train-on-missing-dataset", lambda t, g: ["train", SYNTH, f"data.uri={t}/absent", f"run.storage_path={t}/runs"],
     "manifest.json"),
    # --- URIs ---------------------------------------------------------------------------------
    ("uri-unknown-scheme", lambda t, g: ["data", "synth", "ftp://host/x"], "ftp"),
    ("uri-bad-endpoint", lambda t, g: ["data", "inspect", "s3://bucket/x", "--endpoint-url", "not-a-url"],
     "endpoint_url 'not-a-url': expected http(s)://HOST[:PORT]"),
    # --- credentials --------------------------------------------------------------------------
    ("secret-on-command-line", lambda t, g: ["submit", SYNTH, "data.storage.secret_key=abc"],
     "credentials never go on the command line"),
    ("secret-env-not-set", lambda t, g: ["submit", SYNTH, "--env", "NOT_SET_ANYWHERE_42"],
     "--env NOT_SET_ANYWHERE_42: not set"),
    ("secret-env-bad-name", lambda t, g: ["submit", SYNTH, "--env", "AWS_SECRET_ACCESS_KEY=abc"],
     "expected an environment variable name"),
    # --- CLI arguments ------------------------------------------------------------------------
    ("cli-unknown-command", lambda t, g: ["teleport"], "invalid choice: 'teleport'"),
    ("cli-not-an-integer", lambda t, g: ["demo", "--model-only", "--epochs", "zero"], "--epochs"),
    ("cli-top-zero", lambda t, g: ["best", "--top", "0"], "--top"),
    ("cli-k8s-workers-zero", lambda t, g: ["k8s", "render", "sweeps/demo.yaml", "--image", "x", "--workers", "0",
                                           "--gpus-per-worker", "1"], "--workers"),
    ("cli-cloud-provider", lambda t, g: ["cloud", "render", "--provider", "azure"], "--provider"),
    ("cli-report-no-store", lambda t, g: ["report", "demo", "--tracking-uri", f"sqlite:///{t}/absent.db"],
     "no MLflow store there"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, good_dataset, capsys, monkeypatch):
    _, build, expected = case
    monkeypatch.chdir(tmp_path)  # anything written by mistake would land here
    argv = build(tmp_path, good_dataset)
    before = set(os.listdir(tmp_path))
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out = capsys.readouterr()
    assert code == 2, (argv, out.out, out.err)
    lines = [ln for ln in out.err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err and expected in lines[0], lines[0]
    assert "abc" not in out.err.replace("secret_key", "")  # a secret value is never echoed
    created = set(os.listdir(tmp_path)) - before
    assert not (created & {"runs", "results", "mlflow.db", "mlruns", "reports", "absent", "absent.db", "best.yaml"}), \
        created


def test_the_catalogue_is_at_least_25_cases_across_every_kind():
    kinds = {c[0].split("-")[0] for c in CASES}
    assert len(CASES) >= 25 and {"config", "sweep", "data", "uri", "secret", "cli"} <= kinds
