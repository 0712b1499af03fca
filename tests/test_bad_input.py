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
    if how == "flipped-bytes":  # same size, different content (a feature value): only the hash can tell
        import pyarrow.parquet as pq

        data = bytearray(shard.read_bytes())
        data[data.find(pq.read_table(shard)["features"][0].as_py()[:32]) + 5] ^= 0xFF
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


# --- the second round: one case per mechanism (docs/reliability.md, "Bad input: the mechanisms") ---
SECRET_VAR, SECRET = "VIS4MER_TEST_SECRET", "s3ntinel-Secret-2b9e"
ROOT = Path(SYNTH).parents[1]


def _manifest_edit(good: str, where: Path, edit) -> str:
    out = where / "edited"
    shutil.copytree(good, out)
    m = json.loads((out / "manifest.json").read_text())
    edit(m)
    (out / "manifest.json").write_text(json.dumps(m))
    return str(out)


def _lvu(where: Path, label_line: str, npy: bytes | None = None) -> list[str]:
    import numpy as np

    (where / "labels" / "genre").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (where / "labels" / "genre" / f"{split}.csv").write_text(f"class_id class youtube_id imdb_id\n{label_line}\n")
    (where / "feats").mkdir()
    if npy is None:
        np.save(where / "feats" / "abcdefghijk.npy", np.zeros((2, 197, 1024), np.float16))
    else:
        (where / "feats" / "abcdefghijk.npy").write_bytes(npy)
    return ["data", "import-lvu", "--task", "genre", "--labels", str(where / "labels"), "--features",
            str(where / "feats"), "--out", str(where / "out")]


def _file(where: Path, name: str, text: str) -> str:
    (where / name).write_text(text)
    return str(where / name)


def _sqlite_store(where: Path, body: bytes) -> str:
    (where / "m.db").write_bytes(body)
    return f"sqlite:///{where}/m.db"


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(7))
K8S = ["k8s", "render", "sweeps/lvu_genre.yaml", "data.uri=s3://b/d", "run.storage_path=s3://b/r",
       "--mlflow-uri", "http://mlflow:5000", "--image", "localhost:5000/vis4mer:0.1.0", "--workers", "1",
       "--gpus-per-worker", "1"]

MECHANISMS = [
    # 1. no interpolation, no credentials in URIs, anywhere a config is read
    ("m01-interpolation-override", lambda t, g: ["train", SYNTH, "schedule.kind=${oc.env:" + SECRET_VAR + "}"],
     "schedule.kind: an interpolation"),
    ("m01-interpolation-yaml", lambda t, g: ["train", _file(t, "c.yaml", "run:\n  name: ${oc.env:" + SECRET_VAR
                                                            + "}\n")], "run.name: an interpolation"),
    ("m01-interpolation-sweep", lambda t, g: ["sweep", _sweep(t, overrides={"run.storage_path": "${oc.env:"
                                                                              + SECRET_VAR + "}"})], "interpolation"),
    ("m01-credentials-in-uri", lambda t, g: ["submit", SYNTH, f"tracking.tracking_uri=http://u:{SECRET}@h:5000",
                                             "--address", "http://127.0.0.1:1"], "a user name or password"),
    # 2. paths from manifests and label files stay inside their root
    ("m02-manifest-traversal", lambda t, g: ["data", "verify", _manifest_edit(
        g, t, lambda m: m["shards"][0].update(path="../../other/x.parquet"))], "expected a relative path inside"),
    ("m02-label-id-traversal", lambda t, g: _lvu(t, "0 Drama ../x/y tt01"), "expected a YouTube id"),
    # 3. writes are all-or-nothing and never replace a user's file
    ("m03-synth-into-non-empty", lambda t, g: ["data", "synth", str(t.parent / _file(t, "notes.txt", "mine")).rsplit(
        "/", 1)[0]], "not empty"),
    # 4. full matches: a trailing newline is not a name
    ("m04-newline-in-name", lambda t, g: [*K8S, "--name", "job\n"], "metadata.name"),
    ("m04-newline-in-sweep-name", lambda t, g: ["sweep", _sweep(t, name="x\n")], "expected a name"),
    # 5. ordinary mistakes are one line, not a traceback
    ("m05-out-is-a-folder", lambda t, g: [*K8S, "--out", str(t)], "is a folder"),
    ("m05-out-under-a-file", lambda t, g: [*K8S, "--out", _file(t, "f", "x") + "/job.yaml"], "is a file"),
    ("m05-sweep-is-a-folder", lambda t, g: ["sweep", str(t)], "is a folder"),
    ("m05-label-file-is-a-folder", lambda t, g: (_lvu(t, "0 Drama abcdefghijk tt01"),
                                                 (t / "labels" / "genre" / "val.csv").unlink(),
                                                 (t / "labels" / "genre" / "val.csv").mkdir())[0], "is a folder"),
    ("m05-inf-option", lambda t, g: ["data", "synth", str(t / "o"), "--shard-mb", "inf"], "--shard-mb"),
    ("m05-empty-npy", lambda t, g: _lvu(t, "0 Drama abcdefghijk tt01", npy=b""), "not a readable .npy"),
    ("m05-deep-yaml", lambda t, g: ["train", _file(t, "d.yaml", "a: " + "[" * 3000 + "]" * 3000 + "\n")],
     "nested deeper"),
    ("m05-deep-json", lambda t, g: ["data", "inspect", _manifest_edit(g, t, lambda m: m.update(
        extractor=json.loads("[" * 900 + "]" * 900)))], "manifest"),
    ("m05-tracking-uri-text-file", lambda t, g: ["best", "--tracking-uri", _sqlite_store(t, b"just text")],
     "not an MLflow store"),
    ("m05-tracking-uri-folder", lambda t, g: ["report", "demo", "--tracking-uri", f"sqlite:///{t}"], "is a folder"),
    # 6. messages name the file and field, and show types when values look alike
    ("m06-binary-sweep", lambda t, g: ["sweep", str(t / "s.yaml")] if (t / "s.yaml").write_bytes(b"\xff\xfe\x00bin")
     else [], "s.yaml: not a text file"),
    ("m06-string-rows", lambda t, g: ["data", "verify", _manifest_edit(g, t, lambda m: m["shards"][0].update(
        rows=str(m["shards"][0]["rows"])))], "rows: expected an integer, got str"),
    # 7. one YAML loader: duplicate keys refused by every reader
    ("m07-duplicate-key-sweep", lambda t, g: ["sweep", _file(t, "s.yaml", "name: a\nname: b\n")], "duplicate key"),
    ("m07-duplicate-key-k8s", lambda t, g: ["k8s", "validate", _file(t, "j.yaml", "kind: RayJob\nkind: RayJob\n")],
     "duplicate key"),
    # 8. names go into MLflow filters: restricted before any work
    ("m08-quote-in-sweep-name", lambda t, g: ["sweep", _sweep(t, name="it's")], "expected a name"),
    ("m08-quote-in-best", lambda t, g: ["best", "--sweep", "a' OR '1'='1"], "expected a name"),
    # 9. readers never create a store and never hang
    ("m09-empty-sqlite-file", lambda t, g: ["best", "--tracking-uri", _sqlite_store(t, b"")], "not an MLflow store"),
    ("m09-unreachable-server", lambda t, g: ["best", "--tracking-uri", "http://127.0.0.1:1"], "no answer"),
    # 10. cloud render validates what reaches a shell
    ("m10-cloud-image", lambda t, g: ["cloud", "render", "--provider", "aws", "--image", "ray; curl x | sh"],
     "--image"),
    ("m10-cloud-project", lambda t, g: ["cloud", "render", "--provider", "gcp", "--project", "p$(id)"], "--project"),
    # 11. YAML aliases cannot blow up
    ("m11-alias-bomb", lambda t, g: ["k8s", "validate", _file(t, "b.yaml", ALIAS_BOMB)], "aliases are expanded"),
    # 12. impossible values
    ("m12-lr-inf", lambda t, g: ["train", SYNTH, "optim.lr=inf"], "optim.lr=inf: expected a finite number"),
    ("m12-min-lr", lambda t, g: ["train", SYNTH, "schedule.min_lr=-1"], "schedule.min_lr"),
    ("m12-shuffle-buffer", lambda t, g: ["train", SYNTH, "data.shuffle_buffer=-5"], "data.shuffle_buffer"),
    ("m12-huge-seed", lambda t, g: ["train", SYNTH, f"train.seed={2**64}"], "train.seed"),
    ("m12-inf-cpus", lambda t, g: ["train", SYNTH, "scaling.cpus_per_worker=inf"], "scaling.cpus_per_worker"),
    ("m12-dropout-range", lambda t, g: ["sweep", _sweep(t, search_space={"model.dropout": {"uniform": [0.0, 5.0]}})],
     "model.dropout=5.0"),
    ("m12-sweep-named-null", lambda t, g: ["sweep", _sweep(t, name=None)], "name None"),
    ("m12-negative-shard-size", lambda t, g: ["data", "synth", str(t / "o"), "--shard-mb", "-1"], "--shard-mb"),
    # 13. names never leave the storage path
    ("m13-dotdot-run-name", lambda t, g: ["train", SYNTH, "run.name=.."], "run.name"),
    ("m13-dotdot-sweep-name", lambda t, g: ["sweep", _sweep(t, name="..")], "expected a name"),
    # 14. verify catches inconsistent datasets
    ("m14-unknown-split", lambda t, g: ["data", "verify", _manifest_edit(
        g, t, lambda m: m["shards"][0].update(split="holdout"))], "split 'holdout'"),
    ("m14-shard-in-two-splits", lambda t, g: ["data", "verify", _manifest_edit(
        g, t, lambda m: m["shards"].append(dict(m["shards"][0], split="val")))], "listed twice"),
    # 15. the k8s checks agree with Kubernetes
    ("m15-workers-beyond-int32", lambda t, g: [*K8S[:-4], "--workers", str(2**31), "--gpus-per-worker", "1"],
     "--workers"),
]



def _store_with_only_experiments(where: Path) -> str:
    import sqlite3

    with sqlite3.connect(where / "m.db") as db:
        db.execute("CREATE TABLE experiments (x)")
    return f"sqlite:///{where}/m.db"


def _store_of_another_schema(where: Path, heads: int = 1) -> str:
    import sqlite3

    from mlflow.store.db.base_sql_model import Base
    from mlflow.store.db.utils import _get_latest_schema_revision  # it also fills Base.metadata

    with sqlite3.connect(where / "m.db") as db:
        for table in Base.metadata.tables:
            db.execute(f'CREATE TABLE "{table}" (x)')
        db.execute("CREATE TABLE alembic_version (version_num)")
        db.execute("INSERT INTO alembic_version VALUES ('0123456789ab')")
        if heads == 2:
            db.execute("INSERT INTO alembic_version VALUES (?)", (_get_latest_schema_revision(),))
    return f"sqlite:///{where}/m.db"


# --- later rounds: mechanisms hostile-input probes found (docs/reliability.md 16-27 and 34-40; 28-33 in
# tests/test_bad_input_data.py, 41 in tests/test_extract.py) ---
MECHANISMS_3 = [
    # 16. a line break in a file name or value the user gave stays escaped in the one error line
    ("m16-newline-in-config-name", lambda t, g: ["train", str(t / "bad\nname.yaml")], "bad\\nname.yaml"),
    ("m16-newline-in-sweep-name", lambda t, g: ["sweep", str(t / "s\r\n.yaml")], "no such sweep file"),
    # 18. any OSError on a config path is one line (not a folder, a name too long, a link loop)
    ("m18-config-under-a-file", lambda t, g: ["train", _file(t, "f", "x: 1") + "/c.yaml"], "cannot read"),
    ("m18-config-name-too-long", lambda t, g: ["train", str(t / ("a" * 300 + ".yaml"))], "cannot read"),
    ("m18-config-link-loop", lambda t, g: ["train", str((t / "loop").symlink_to(t / "loop") or t / "loop")],
     "cannot read"),
    # 19. tracking stores are checked as MLflow will open them: drivers, credentials, ports
    ("m19-store-driver-missing", lambda t, g: ["best", "--tracking-uri", "mssql://db.example/mlflow"],
     "needs the database driver"),
    ("m19-databricks-no-credentials", lambda t, g: ["report", "demo", "--tracking-uri", "databricks://nobody"],
     "no Databricks credentials"),
    ("m19-port-out-of-range", lambda t, g: ["best", "--tracking-uri", "http://127.0.0.1:99999"], "not a valid URI"),
    ("m19-train-store-driver", lambda t, g: ["train", SYNTH, f"data.uri={g}", "tracking.tracking_uri=mysql://h/d"],
     "needs the database driver"),
    # 20. readers never change a store: MLflow would create missing tables or migrate another schema
    ("m20-sqlite-with-only-experiments", lambda t, g: ["best", "--tracking-uri", _store_with_only_experiments(t)],
     "not an MLflow store"),
    ("m20-store-of-another-schema", lambda t, g: ["report", "demo", "--tracking-uri", _store_of_another_schema(t)],
     "mlflow db upgrade"),
    # 21. aliases inside the value they name are refused by the one loader (every walker recursed)
    ("m21-cyclic-config", lambda t, g: ["train", _file(t, "c.yaml", "a: &a [*a]\n")], "a cycle"),
    ("m21-cyclic-k8s", lambda t, g: ["k8s", "validate", _file(t, "j.yaml", "kind: &k {a: *k}\n")], "a cycle"),
    # 22. integer options are bounded (numpy's seed range, int32 counts)
    ("m22-negative-seed", lambda t, g: ["data", "synth", str(t / "o"), "--seed", "-1"], "--seed"),
    ("m22-huge-count", lambda t, g: ["data", "synth", str(t / "o"), "--frames", str(10**20)], "--frames"),
    # 23. the job API's address: a dashboard URL, at once (Ray would wait 40 s for a GCS there)
    ("m23-address-without-scheme", lambda t, g: ["jobs", "list", "--address", "127.0.0.1:1"], "--address http://"),
    ("m23-ray-client-address", lambda t, g: ["jobs", "list", "--address", "ray://127.0.0.1:1"], "expected the Ray"),
    # 24. the demo checks its config before it writes its data
    ("m24-demo-bad-store", lambda t, g: ["demo", "--data", str(t / "d"), "tracking.tracking_uri=ftp://x"],
     "tracking URI"),
    ("m24-demo-batch-too-large", lambda t, g: ["demo", "--data", str(t / "d"), "data.batch_size=4096"],
     "data.batch_size=4096"),
    # 25. ASHA's and the budget's integers before Ray: positive, not bools, grace within max_t
    ("m25-asha-reduction-factor", lambda t, g: ["sweep", _sweep(t, scheduler={"kind": "asha", "reduction_factor": 1})],
     "scheduler.reduction_factor=1"),
    ("m25-asha-grace-beyond-max-t", lambda t, g: ["sweep", _sweep(t, scheduler={"kind": "asha", "grace_period": 9,
                                                                                 "max_t": 3})], "grace_period=9"),
    ("m25-budget-bool", lambda t, g: ["sweep", _sweep(t, budget={"num_samples": True})], "num_samples=True"),
    # 26. where runs and stores are written is checked before Ray
    ("m26-storage-path-under-a-file", lambda t, g: ["train", SYNTH, f"data.uri={g}",
                                                    "run.storage_path=" + _file(t, "f", "x") + "/runs"], "is a file"),
    # 27. Kubernetes' own patterns (Go: `$` ends the text) and int32 counts in cluster configs
    ("m27-quantity-with-newline", lambda t, g: ["k8s", "validate", _rendered_with(t, "memory: 64Gi",
                                                                                   'memory: "64Gi\\n"')],
     "Kubernetes quantity"),
    ("m27-cloud-workers-beyond-int32", lambda t, g: ["cloud", "validate", _cloud_with(t, "max_workers: 2",
                                                                                       f"max_workers: {10**22}")],
     "max_workers="),
    # 34. a store with two schema heads (alembic would refuse it after opening)
    ("m34-store-with-two-heads", lambda t, g: ["best", "--tracking-uri", _store_of_another_schema(t, heads=2)],
     "mlflow db upgrade"),
    # 37. k8s render checks its MLflow URI's host and port, and that quantities are positive
    ("m37-mlflow-uri-unparsable", lambda t, g: [*K8S[:6], "http://[::1", *K8S[7:]], "--mlflow-uri"),
    ("m37-mlflow-uri-port", lambda t, g: [*K8S[:6], "http://mlflow:99999", *K8S[7:]], "--mlflow-uri"),
    ("m37-negative-memory", lambda t, g: [*K8S, "--memory=-64Gi"], "expected a positive quantity"),
    # 38. --out never replaces a symlink, a device or a pipe
    ("m38-out-is-a-symlink", lambda t, g: ["cloud", "render", "--provider", "aws", "--out",
                                           str((t / "l").symlink_to("/dev/null") or t / "l")], "is a symlink"),
    # 40. what `submit` sends carries no credential: not in an override's value, a requirement, an odd id
    ("m40-secret-value-in-override", lambda t, g: ["submit", SYNTH, f"tracking.experiment={SECRET}", "--address",
                                                   "http://127.0.0.1:1"], "holds a credential"),
    ("m40-credential-in-pip", lambda t, g: ["submit", SYNTH, "--pip", f"git+https://u:{SECRET}@h/x", "--address",
                                            "http://127.0.0.1:1"], "--pip"),
    ("m40-odd-submission-id", lambda t, g: ["submit", SYNTH, "--submission-id", "../x\ny", "--address",
                                            "http://127.0.0.1:1"], "--submission-id"),
]


def _rendered_with(where: Path, old: str, new: str) -> str:
    from tests.support.cli import run_main

    out = where.parent / "job.yaml"
    assert run_main([*K8S, "--out", str(out)], ROOT).code == 0
    (where / "j.yaml").write_text(out.read_text().replace(old, new, 1))
    out.unlink()
    return str(where / "j.yaml")


def _cloud_with(where: Path, old: str, new: str) -> str:
    from tests.support.cli import run_main

    out = where.parent / "c.yaml"
    assert run_main(["cloud", "render", "--provider", "aws", "--out", str(out)], ROOT).code == 0
    text = out.read_text()
    assert old in text
    (where / "c.yaml").write_text(text.replace(old, new, 1))
    out.unlink()
    return str(where / "c.yaml")


@pytest.mark.parametrize("case", MECHANISMS + MECHANISMS_3, ids=[c[0] for c in MECHANISMS + MECHANISMS_3])
def test_each_mechanism_keeps_the_contract(case, tmp_path, good_dataset, monkeypatch):
    """Would have broken the contract before the second round (a traceback, a secret in the output,
    a file replaced, a value accepted); each case is one mechanism's representative."""
    from tests.support.cli import assert_contract, files_under, run_main

    monkeypatch.setenv(SECRET_VAR, SECRET)
    monkeypatch.chdir(ROOT)
    _, build, expected = case
    (tmp_path / "work").mkdir()
    argv = build(tmp_path / "work", good_dataset)
    before = files_under(tmp_path)
    r = run_main(argv, ROOT)
    after = files_under(tmp_path)
    assert_contract(r, argv, SECRET, {k: v for k, v in after.items() if before.get(k) != v})
    assert r.code == 2, (argv, r.out[-500:])
    assert expected in r.err, r.err
    assert after == before  # nothing written, nothing replaced


def test_positive_twins_of_the_mechanisms(tmp_path, good_dataset):
    """What the mechanisms must still let through: an image with a registry port, a CSV with
    Excel's byte-order mark, a dataset overwritten on purpose."""
    from tests.support.cli import run_main
    from vis4mer.datasets.extract import read_labels
    from vis4mer.datasets.tasks import get_task

    r = run_main([*K8S, "--out", str(tmp_path / "job.yaml")], ROOT)
    assert r.code == 0, r.err
    (tmp_path / "l.csv").write_text("\ufeffvideo_id,label,split\nv1,2,val\n", encoding="utf-8")
    assert read_labels(str(tmp_path / "l.csv"), get_task("breakfast"), None) == {"v1": (2, "val")}
    out = str(tmp_path / "ds")
    for overwrite in ([], ["--overwrite"]):
        assert run_main(["data", "synth", out, "--videos", "4", "2", "2", "--frames", "8", *overwrite],
                        tmp_path).code == 0
    assert run_main(["data", "verify", out], tmp_path).code == 0


@pytest.mark.parametrize("state", ["garbage", "no-model-key", "other-weights"])
def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, good_dataset, state):
    """35. evaluate / promote / predict load a run's checkpoint: a file torch cannot read, or weights of
    another model, is the checkpoint's fault (a ConfigError naming it), not a traceback."""
    import io

    import torch

    from vis4mer.datasets.storage import filesystems
    from vis4mer.orchestrator.train.config import ConfigError, load_config
    from vis4mer.orchestrator.train.driver import _load_model
    from vis4mer.orchestrator.train.worker import STATE

    cfg = load_config(SYNTH, [f"data.uri={good_dataset}"])
    buf = io.BytesIO()
    if state == "garbage":
        buf.write(b"\x80\x04not a pickle")
    else:
        torch.save({"optimizer": {}} if state == "no-model-key" else {"model": {"w": torch.zeros(3)}}, buf)
    (tmp_path / STATE).write_bytes(buf.getvalue())
    with pytest.raises(ConfigError, match=str(tmp_path / STATE)) as e:
        _load_model(cfg, filesystems(str(tmp_path)), None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tag", ["{not json", "[1, 2]", '"x"', "null", "[" * 5000])
def test_a_trial_params_tag_that_is_not_an_object_names_the_run(tag):
    """36. best / report / evaluate read each trial's params tag: anything but a JSON object names the run."""
    from types import SimpleNamespace

    from vis4mer.orchestrator.sweep.lookup import trial_params
    from vis4mer.orchestrator.train.config import ConfigError
    from vis4mer.orchestrator.train.tracking import Tag

    run = SimpleNamespace(info=SimpleNamespace(run_id="r123"), data=SimpleNamespace(tags={Tag.PARAMS: tag}))
    with pytest.raises(ConfigError, match="run r123: tag"):
        trial_params(run)
    ok = SimpleNamespace(info=run.info, data=SimpleNamespace(tags={Tag.PARAMS: '{"optim.lr": 0.001}'}))
    assert trial_params(ok) == {"optim.lr": 0.001}


def test_report_checks_its_folder_before_any_work(tmp_path):
    """37. report --out: a folder that can be made and written, checked before the store is read."""
    from vis4mer.datasets.errors import UserError
    from vis4mer.orchestrator.sweep.report import make_report

    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "r"):
        with pytest.raises(UserError, match="--out"):
            make_report(f"sqlite:///{tmp_path}/absent.db", None, "demo", str(out))
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_written_yaml_reads_back_as_written():
    """39. strings the reader would take for numbers (a quantity of 1e400, a version 1.0) are quoted."""
    from vis4mer.orchestrator.files import dump_yaml, parse_yaml

    obj = {"memory": "1e400", "v": "1.0", "n": ".5", "inf": ".inf", "q": "64Gi", "x": 1.5, "i": 3}
    assert parse_yaml(dump_yaml(obj), "x") == obj
