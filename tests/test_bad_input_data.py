"""Bad input in data files: shards, manifests, .npy features, safetensors weights and dataset targets.

Each mechanism (docs/reliability.md, "Bad input") is fed many generated inputs through the real CLI,
in-process (tests/support/cli.py): every run ends with exit code 2 and one stderr line naming the
culprit (the file, field, key or video), no traceback, and no file changed; a legit twin of each
input still succeeds. No Ray, no servers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support.cli import assert_contract, files_under, run_main
from vis4mer.datasets.format import DatasetError, open_dataset, shard_writer_options

EXAMPLES = int(os.environ.get("VIS4MER_HYPOTHESIS_EXAMPLES", "30"))
PROFILE = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("VIS4MER_HYPOTHESIS_RANDOM"),
                   database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    from vis4mer.datasets.synthetic import write_synthetic

    uri = tmp_path_factory.mktemp("good") / "G"
    write_synthetic(str(uri), videos=(8, 4, 4), frames=16, min_frames=12, tokens=2, dim=4, seed=0)
    return uri


def _run(argv: list[str], cwd: Path, fail: bool, culprits: tuple[str, ...] = ()):
    """Runs `vis4mer ARGV` in cwd; checks the contract, that nothing under cwd changed on failure, and
    (fail) exit 2 with every culprit in the line (else exit 0). Warnings are errors: outside pytest
    they are lines on stderr (numpy's RuntimeWarning before the error line, a ComplexWarning)."""
    before = files_under(cwd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = run_main(argv, cwd)
    assert_contract(r, argv)
    if fail:
        assert r.code == 2, (argv, r.code, r.out[-500:], r.err[-2000:])
        for c in culprits:
            assert c in r.err, (argv, c, r.err)
        assert files_under(cwd) == before, argv
    else:
        assert r.code == 0, (argv, r.err[-2000:])
    return r


def _copy(good: Path, where: Path) -> tuple[Path, dict]:
    out = where / "ds"
    shutil.copytree(good, out)
    return out, json.loads((out / "manifest.json").read_text())


def _rehash(ds: Path) -> None:
    """The manifest's sizes and hashes made to match the shards (only the content can be wrong)."""
    m = json.loads((ds / "manifest.json").read_text())
    for s in m["shards"]:
        data = (ds / s["path"]).read_bytes()
        s["bytes"], s["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (ds / "manifest.json").write_text(json.dumps(m, indent=2))


def _reader_reads_all_or_names_the_shard(ds: Path, shard: str) -> None:
    """The training input's own reads (the split index, then each video) on the same shards: every
    video read, or a DatasetError naming the shard."""
    from vis4mer.datasets.reader import ShardReader, video_index

    opened = open_dataset(str(ds))
    try:
        for split in sorted(opened.manifest.split_rows()):
            index = video_index(opened, split).to_pylist()
            reader = ShardReader(opened)
            for row in index:
                reader.video(row["shard"], row["row_group"], row["row"], row["video_id"], row["num_frames"])
    except DatasetError as e:
        assert shard in str(e), str(e)


# --- 1. shards whose footer and hash are right but whose content is not -----------------------------


def test_verify_names_a_shard_overwritten_with_matching_hash(good, tmp_path):
    ds, m = _copy(good, tmp_path)
    shard = ds / m["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[200:800] = b"A" * 600
    shard.write_bytes(bytes(data))
    _rehash(ds)
    _run(["data", "verify", str(ds)], tmp_path, fail=True, culprits=(str(shard), "expected"))
    _reader_reads_all_or_names_the_shard(ds, str(shard))


@PROFILE
@given(start=st.integers(0, 4000), length=st.integers(1, 1500), fill=st.binary(min_size=1, max_size=4),
       which=st.integers(0, 2))
def test_damaged_shard_bytes_keep_the_contract(good, start, length, fill, which):
    """Any stretch of a shard overwritten (hash updated): verify passes (harmless bytes) or names the shard;
    the training reader reads or names the shard. Never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        ds, m = _copy(good, Path(tmp))
        shard = ds / m["shards"][which]["path"]
        data = bytearray(shard.read_bytes())
        footer = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # leave the footer (and its length) intact
        assume(start < footer)
        end = min(start + length, footer)
        data[start:end] = (fill * (end - start))[: end - start]
        shard.write_bytes(bytes(data))
        _rehash(ds)
        argv = ["data", "verify", str(ds)]
        before = files_under(Path(tmp))
        r = run_main(argv, Path(tmp))
        assert_contract(r, argv)
        assert files_under(Path(tmp)) == before
        if r.code == 2:
            assert str(shard) in r.err or "video" in r.err, r.err
        _reader_reads_all_or_names_the_shard(ds, str(shard))


def _with_nulls(shard: Path, column: str, rows: list[int]) -> None:
    t = pq.read_table(shard)
    i = t.schema.get_field_index(column)
    values = t.column(column).to_pylist()
    col = pa.array([None if r in rows else v for r, v in enumerate(values)], t.schema.field(column).type)
    pq.write_table(t.set_column(i, t.schema.field(column), col), shard, row_group_size=1, **shard_writer_options())


@pytest.mark.parametrize("column", ["label", "video_id", "split", "num_frames", "features"])
@pytest.mark.parametrize("rows", ["all", "one"])
def test_null_values_in_a_shard_are_named(good, tmp_path, column, rows):
    ds, m = _copy(good, tmp_path)
    shard = ds / m["shards"][0]["path"]
    n = m["shards"][0]["rows"]
    _with_nulls(shard, column, list(range(n)) if rows == "all" else [n // 2])
    _rehash(ds)
    _run(["data", "verify", str(ds)], tmp_path, fail=True, culprits=(str(shard), column, "null"))
    _reader_reads_all_or_names_the_shard(ds, str(shard))


@pytest.mark.parametrize("label", [None, "3", True, [1]])
def test_check_label_refuses_what_is_not_a_number(label):
    from vis4mer.datasets.format import check_label
    from vis4mer.datasets.tasks import get_task

    for task in (get_task("synthetic_order"), get_task("synthetic_gap")):
        with pytest.raises(DatasetError, match=r"^video v: label .*: expected"):
            check_label(label, task, "video v")
    assert check_label(np.int64(1), get_task("synthetic_order"), "v") == 1  # the twin
    assert check_label(0.5, get_task("synthetic_gap"), "v") == 0.5


# --- 2. .npy features of a dtype that is not real numbers, or beyond float16 -------------------------


LVU_ID = "abcDEF123_-"


def _lvu_inputs(root: Path, x: np.ndarray) -> list[str]:
    labels = root / "lvu" / "genre"
    labels.mkdir(parents=True)
    (labels / "train.csv").write_text(f"class_id class_name youtube_id imdb_id\n1 Action {LVU_ID} tt0000001\n")
    for split in ("val", "test"):
        (labels / f"{split}.csv").write_text("class_id class_name youtube_id imdb_id\n")
    (root / "feats").mkdir()
    np.save(root / "feats" / f"{LVU_ID}.npy", x)
    return ["data", "import-lvu", "--task", "genre", "--labels", str(root / "lvu"), "--features",
            str(root / "feats"), "--out", str(root / "out")]


SHAPE = (2, 197, 1024)
NOT_REAL = ["U2", "S2", "complex64", "complex128", "bool", "datetime64[s]", "timedelta64[ms]",
            [("a", "<f4"), ("b", "<i4")], "V4", "clongdouble"]
REAL = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64",
        ">f4", ">i8", "longdouble"]


@PROFILE
@given(dtype=st.sampled_from(NOT_REAL), fill=st.integers(0, 3))
def test_lvu_import_refuses_features_that_are_not_real_numbers(dtype, fill):
    with tempfile.TemporaryDirectory() as tmp:
        x = np.zeros(SHAPE, dtype=np.dtype(dtype))
        if np.dtype(dtype).kind in "USbc":
            x[...] = {"U": "ab", "S": b"ab", "b": True, "c": 1 + 2j}[np.dtype(dtype).kind] if fill else x[0, 0, 0]
        argv = _lvu_inputs(Path(tmp), x)
        _run(argv, Path(tmp), fail=True, culprits=(f"{LVU_ID}.npy", "dtype", "expected"))
        assert not (Path(tmp) / "out").exists()


@PROFILE
@given(dtype=st.sampled_from(["float32", "float64", "int32", "int64", "uint32", "longdouble"]),
       value=st.one_of(st.floats(65520, 1e300), st.floats(-1e300, -65520), st.sampled_from([np.nan, np.inf, -np.inf])))
def test_lvu_import_refuses_values_beyond_float16_without_warnings(dtype, value):
    """One line (no numpy RuntimeWarning before it) naming the file."""
    info = np.finfo(dtype) if np.dtype(dtype).kind == "f" else np.iinfo(dtype)
    assume(np.isnan(value) or float(info.min) < value < float(info.max))
    assume(np.dtype(dtype).kind == "f" or np.isfinite(value))
    with tempfile.TemporaryDirectory() as tmp:
        x = np.zeros(SHAPE, dtype=dtype)
        x[1, 5, 7] = value
        argv = _lvu_inputs(Path(tmp), x)
        _run(argv, Path(tmp), fail=True, culprits=(f"{LVU_ID}.npy",))


@PROFILE
@given(dtype=st.sampled_from(REAL), value=st.integers(-100, 100))
def test_lvu_import_accepts_every_real_numeric_dtype(dtype, value):
    """The twin: integers and floats of any width and byte order, within float16, are imported."""
    if np.dtype(dtype).kind == "u":
        value = abs(value)
    with tempfile.TemporaryDirectory() as tmp:
        x = np.full(SHAPE, value, dtype=dtype)
        argv = _lvu_inputs(Path(tmp), x)
        _run(argv, Path(tmp), fail=False)
        r = run_main(["data", "verify", str(Path(tmp) / "out")], Path(tmp))
        assert r.code == 0, r.err


def test_as_float16_is_the_writers_cast():
    from vis4mer.datasets.format import as_float16

    assert as_float16(np.arange(6, dtype=np.int64).reshape(1, 2, 3), "f").dtype == np.float16
    for bad in (np.zeros(3, complex), np.zeros(3, "U1"), np.zeros(3, bool), np.full(3, 1e10)):
        with pytest.raises(DatasetError, match=r"^f: "):
            as_float16(bad, "f")


# --- 3. safetensors headers that are valid JSON but not a valid layout -------------------------------


def _safetensors(header: object, data: bytes) -> bytes:
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def _good_header() -> tuple[dict, bytes]:
    a = np.arange(6, dtype=np.float32)
    b = np.arange(4, dtype=np.int64)
    return ({"__metadata__": {"format": "pt"},
             "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
             "b": {"dtype": "I64", "shape": [4], "data_offsets": [24, 56]}}, a.tobytes() + b.tobytes())


def _extract_argv(root: Path, weights: bytes) -> list[str]:
    (root / "videos").mkdir(exist_ok=True)
    (root / "w.safetensors").write_bytes(weights)
    return ["extract", "--videos", str(root / "videos"), "--out", str(root / "out"), "--extractor", "vit",
            "--arch", "tiny", "--weights", str(root / "w.safetensors")]


HOSTILE_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                                      st.text(max_size=8)),
                            lambda c: st.one_of(st.lists(c, max_size=3), st.dictionaries(st.text(max_size=6), c,
                                                                                           max_size=3)),
                            max_leaves=8)
FIELD_VALUES = {
    "dtype": st.one_of(HOSTILE_JSON, st.sampled_from(["F8", "f32", "U8", "BOOL", "F32 "])),
    "shape": st.one_of(HOSTILE_JSON, st.lists(st.integers(-3, 2**64), max_size=4), st.just([2, 3, 2**63])),
    "data_offsets": st.one_of(HOSTILE_JSON, st.lists(st.integers(-5, 2**64), max_size=3), st.just([0, 3]),
                              st.just([24, 0]), st.just([0, 10**9])),
}


@PROFILE
@given(how=st.sampled_from(["replace-header", "replace-tensor", "field", "drop-field", "length"]),
       tensor=st.sampled_from(["a", "b"]), key=st.sampled_from(sorted(FIELD_VALUES)), data=st.data())
def test_malformed_safetensors_headers_are_named(how, tensor, key, data):
    header, raw = _good_header()
    weights = None
    if how == "replace-header":
        header = data.draw(HOSTILE_JSON.filter(lambda h: h != {}), label="header")
    elif how == "replace-tensor":
        header[tensor] = data.draw(HOSTILE_JSON, label="entry")
    elif how == "field":
        header[tensor][key] = data.draw(FIELD_VALUES[key], label="value")
    elif how == "drop-field":
        del header[tensor][key]
    else:
        head = json.dumps(header).encode()
        n = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.integers(0, len(head) + 100)), label="length")
        weights = struct.pack("<Q", n) + head + raw
        assume(n != len(head))
    with tempfile.TemporaryDirectory() as tmp:
        argv = _extract_argv(Path(tmp), weights if weights is not None else _safetensors(header, raw))
        _run(argv, Path(tmp), fail=True, culprits=("w.safetensors",))


@pytest.mark.parametrize("header,data", [
    ([1], b""),
    ({"a": {}}, b""),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 3]}}, b"abc"),
    ({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 8]}}, b"x" * 8),
    ({"a": {"dtype": "F32", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b""),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', b"abcd"),
    (b"[" * 100_000, b""),
], ids=["list", "no-fields", "3-bytes", "shape-vs-data", "huge-empty", "duplicate-key", "deep"])
def test_the_probes_safetensors_are_named(tmp_path, header, data):
    _run(_extract_argv(tmp_path, _safetensors(header, data)), tmp_path, fail=True, culprits=("w.safetensors",))


_SAFE_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


@PROFILE
@given(tensors=st.dictionaries(st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=5),
                               st.tuples(st.sampled_from([*_SAFE_DTYPES, "BF16"]),
                                         st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=4))
def test_valid_safetensors_load(tensors):
    """The twin: any layout the format allows (dtypes, shapes, empty tensors) loads, values intact."""
    import torch

    from vis4mer.datasets.encoders import load_state_dict

    header, blobs, offset, want = {}, [], 0, {}
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) if shape else 1
        if dtype == "BF16":
            t = torch.arange(n, dtype=torch.float32).to(torch.bfloat16).reshape(shape)
            blob, want[name] = t.view(torch.int16).numpy().tobytes(), t.float()
        else:
            a = np.arange(n).astype(_SAFE_DTYPES[dtype]).reshape(shape)
            blob, want[name] = a.tobytes(), torch.from_numpy(a)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    sd = load_state_dict(_safetensors(header, b"".join(blobs)), "w.safetensors")
    assert set(sd) == set(want)
    for name, t in want.items():
        assert sd[name].shape == t.shape and torch.equal(sd[name], t), name


def test_the_fixture_weights_get_past_the_weights_check(tmp_path):
    """The twin through the CLI: the test ViT's weights are read; the run stops at the empty videos
    folder (the next check), not at the weights."""
    argv = _extract_argv(tmp_path, (FIXTURES / "vit_tiny.safetensors").read_bytes())
    r = _run(argv, tmp_path, fail=True, culprits=(str(tmp_path / "videos"),))
    assert "w.safetensors" not in r.err


# --- 4. dataset targets that exist but are not folders ------------------------------------------------


SYNTH = ["--videos", "8", "4", "4", "--frames", "16", "--tokens", "2", "--dim", "4"]


def _make_target(root: Path, kind: str) -> Path:
    d = root / "d"
    if kind == "dangling":
        os.symlink("/nowhere/x", d)
    elif kind == "loop":
        os.symlink(root / "d", d)
    elif kind == "loop2":
        os.symlink(root / "e", d)
        os.symlink(root / "d", root / "e")
    elif kind == "to-file":
        (root / "f").write_text("x")
        os.symlink(root / "f", d)
    elif kind == "fifo":
        os.mkfifo(d)
    elif kind == "relative-dangling":
        os.symlink("missing/deeper", d)
    return d


@pytest.mark.parametrize("kind", ["dangling", "loop", "loop2", "to-file", "fifo", "relative-dangling"])
@pytest.mark.parametrize("below", [False, True], ids=["target", "parent"])
@pytest.mark.parametrize("command", ["synth", "import-lvu"])
def test_targets_that_are_not_folders_are_named(tmp_path, kind, below, command):
    d = _make_target(tmp_path, kind)
    target = d / "sub" if below else d
    if command == "synth":
        argv = ["data", "synth", str(target), *SYNTH]
    else:
        argv = _lvu_inputs(tmp_path / "in", np.zeros(SHAPE, np.float32))
        argv[-1] = str(target)
    _run(argv, tmp_path, fail=True, culprits=(str(d), "expected"))
    assert os.path.lexists(d) and not os.path.isdir(d)


def test_a_symlink_to_an_empty_folder_is_a_target(tmp_path):
    """The twin: a symlink to a real (empty) folder is written through."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "d")
    _run(["data", "synth", str(tmp_path / "d"), *SYNTH], tmp_path, fail=False)
    assert os.path.islink(tmp_path / "d") and (tmp_path / "real" / "manifest.json").is_file()
    assert run_main(["data", "verify", str(tmp_path / "d")], tmp_path).code == 0


# --- 5. task fields out of range, or a metric / aggregation vis4mer does not compute -----------------


BAD_TASK_FIELDS = {
    "num_classes": [2**70, 10**9, 100_001, 2**31, 1, 0, -1],
    "window_frames": [2**62, 2**31, 2**40, 0, -5],
    "eval_stride": [2**40, 2**31, 0, -1],
    "tokens_per_frame": [2**31, 2**62, 0],
    "feature_dim": [2**40, 2**31, 0],
    "metric": ["auc", "mse", "", "top1 ", "TOP1", "val_top1", "acc"],
    "aggregate": ["median", "mean", "", "sum", "max"],
    "train_sampling": ["uniform", ""],
    "eval_sampling": ["dense", ""],
    "type": ["ranking", ""],
}


def _edit_task(ds: Path, **changes) -> None:
    m = json.loads((ds / "manifest.json").read_text())
    m["task"].update(changes)
    for key in ("tokens_per_frame", "feature_dim"):  # the top-level copies agree: only the bound can fail
        if key in changes:
            m[key] = changes[key]
    (ds / "manifest.json").write_text(json.dumps(m, indent=2))


@PROFILE
@given(pair=st.sampled_from([(k, v) for k, vs in BAD_TASK_FIELDS.items() for v in vs]),
       command=st.sampled_from(["verify", "inspect"]))
def test_task_fields_out_of_range_are_named(good, pair, command):
    field, value = pair
    with tempfile.TemporaryDirectory() as tmp:
        ds, _ = _copy(good, Path(tmp))
        _edit_task(ds, **{field: value})
        _run(["data", command, str(ds)], Path(tmp), fail=True, culprits=("manifest.json", field, "expected"))


@PROFILE
@given(pair=st.sampled_from([("num_classes", 2), ("num_classes", 100_000), ("num_classes", 17),
                             ("window_frames", 1), ("window_frames", 2**20), ("eval_stride", 7),
                             ("eval_stride", 2**31 - 1), ("metric", "top1"), ("aggregate", "sum_softmax"),
                             ("label_transform", "x / 2"), ("name", "my task")]))
def test_legit_task_fields_still_verify(good, pair):
    field, value = pair
    with tempfile.TemporaryDirectory() as tmp:
        ds, _ = _copy(good, Path(tmp))
        _edit_task(ds, **{field: value})
        _run(["data", "verify", str(ds)], Path(tmp), fail=False)


def test_every_registered_task_is_valid():
    from vis4mer.datasets.tasks import TASKS

    for task in TASKS.values():
        task.validate()


# --- 6. a manifest that lists no shards ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_manifest_without_shards_is_refused(good, tmp_path, command):
    ds, m = _copy(good, tmp_path)
    m["shards"], m["splits"] = [], {}
    (ds / "manifest.json").write_text(json.dumps(m))
    _run(["data", command, str(ds)], tmp_path, fail=True, culprits=("manifest.json", "shards", "expected"))


# --- 7. duplicate keys in manifest.json ---------------------------------------------------------------


def _dump_with_duplicate(obj, path: tuple, key: str, twin) -> str:
    """JSON of obj, with `key` of the object at `path` given twice: first as `twin`, then its value."""
    if isinstance(obj, dict):
        items = [(k, _dump_with_duplicate(v, path[1:] if path and path[0] == k else (None,), key, twin))
                 for k, v in obj.items()]
        if path == ():
            items.insert(0, (key, json.dumps(twin)))
        return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in items) + "}"
    if isinstance(obj, list):
        return "[" + ", ".join(_dump_with_duplicate(v, path[1:] if path and path[0] == i else (None,), key, twin)
                               for i, v in enumerate(obj)) + "]"
    return json.dumps(obj)


def _dict_paths(obj, path=()):
    if isinstance(obj, dict):
        if obj:
            yield path
        for k, v in obj.items():
            yield from _dict_paths(v, (*path, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _dict_paths(v, (*path, i))


@PROFILE
@given(data=st.data(), same=st.booleans(), command=st.sampled_from(["verify", "inspect"]))
def test_duplicate_manifest_keys_are_named(good, data, same, command):
    manifest = json.loads((good / "manifest.json").read_text())
    path = data.draw(st.sampled_from(list(_dict_paths(manifest))), label="path")
    obj = manifest
    for p in path:
        obj = obj[p]
    key = data.draw(st.sampled_from(sorted(obj)), label="key")
    twin = obj[key] if same else data.draw(HOSTILE_JSON, label="twin")
    with tempfile.TemporaryDirectory() as tmp:
        ds, _ = _copy(good, Path(tmp))
        (ds / "manifest.json").write_text(_dump_with_duplicate(manifest, path, key, twin))
        _run(["data", command, str(ds)], Path(tmp), fail=True, culprits=("manifest.json", repr(key), "twice"))


def test_a_manifest_without_duplicates_still_verifies(good, tmp_path):
    """The twin: the same serialiser without a duplicate (keys in another order) verifies."""
    ds, m = _copy(good, tmp_path)
    (ds / "manifest.json").write_text(json.dumps(m, sort_keys=True, indent=1))
    _run(["data", "verify", str(ds)], tmp_path, fail=False)
