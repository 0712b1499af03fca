"""Feature shards on a real S3-protocol server (moto, loopback), read back through Ray Data."""
from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.runs import VIS4MER
from vis4mer.datasets.errors import UserError
from vis4mer.datasets.format import (
    DatasetError,
    DatasetWriter,
    features_to_binary,
    open_dataset,
    shard_schema,
    verify,
)
from vis4mer.datasets.storage import StorageError, StorageOptions, filesystems, read_text
from vis4mer.datasets.tasks import get_task
from vis4mer.datasets.windows import (
    VideoAggregator,
    device_windows,
    eval_examples,
    eval_starts,
    example_rng,
    train_example,
)

pytestmark = pytest.mark.ray


def make_videos(n: int, tokens: int, dim: int, seed: int, frames=(5, 12)):
    rng = np.random.default_rng(seed)
    return {f"v{i:03d}": (rng.standard_normal((int(rng.integers(*frames)), tokens, dim)).astype(np.float16),
                          int(rng.integers(0, 3))) for i in range(n)}


def write(uri, videos, storage=None, task=None, split_of=lambda i: "train", **kw):
    task = task or get_task("synthetic_order", tokens_per_frame=3, feature_dim=8, window_frames=6,
                            eval_stride=2, num_classes=3)
    with DatasetWriter(uri, task, {"name": "test"}, storage=storage, **kw) as w:
        for i, (vid, (x, y)) in enumerate(videos.items()):
            w.add(vid, x, y, split_of(i))
    return w.manifest, task


def s3(s3_server) -> StorageOptions:
    return StorageOptions(endpoint_url=s3_server.endpoint)


def test_round_trip_through_ray_data_on_s3(s3_server, s3_bucket, ray_session):
    from vis4mer.datasets.pipeline import eval_videos, read_split, train_batches
    from vis4mer.datasets.reader import ShardReader

    bucket, _ = s3_bucket
    uri = f"s3://{bucket}/syn"
    videos = make_videos(23, 3, 8, seed=1)
    manifest, task = write(uri, videos, s3(s3_server), split_of=lambda i: "train" if i < 17 else "val",
                           shard_bytes=4000, row_group_bytes=1000)
    assert len(manifest.shards) > 2  # several shards, several row groups each
    ds = open_dataset(uri, s3(s3_server))
    assert ds.manifest.split_rows() == {"train": 17, "val": 6}

    # raw rows: exact float16 round trip
    rows = {}
    for batch in read_split(ds, "train", index=False).iter_batches(batch_size=5, batch_format="pyarrow"):
        from vis4mer.datasets.format import video_features
        for vid, x in zip(batch.column("video_id").to_pylist(), video_features(batch.column("features"), 3, 8)):
            rows[vid] = x
    assert set(rows) == {f"v{i:03d}" for i in range(17)}
    for vid, x in rows.items():
        np.testing.assert_array_equal(x, videos[vid][0])

    # training examples: the windows the paper samples, from (seed, epoch, video) only
    got = {}
    reader = ShardReader(ds)
    for b in train_batches(read_split(ds, "train"), task, batch_size=4, seed=7, epoch=2, drop_last=False,
                           reader=reader, shuffle=True):
        assert b["x"].dtype.is_floating_point and b["x"].shape[1:] == (task.seq_len, 8)
        for x, y in zip(b["x"].numpy(), b["y"].tolist()):
            got.setdefault(y, []).append(x)
    expected = {}
    for vid in rows:
        x, y = videos[vid]
        expected.setdefault(y, []).append(train_example(x, task, example_rng(7, 2, vid)))
    for y in expected:
        assert sorted(map(bytes, map(np.ascontiguousarray, got[y]))) == sorted(map(bytes, expected[y]))

    # evaluation: each video once, its windows cut from it (here on the CPU) at the stride
    counts = {}
    for video in eval_videos(read_split(ds, "val"), task, reader):
        np.testing.assert_array_equal(video["x"].numpy(), videos[video["video_id"]][0])
        windows = list(device_windows(video["x"], task, batch_size=5))
        assert all(len(w) <= 5 for w in windows)
        counts[video["video_id"]] = sum(len(w) for w in windows)
    assert counts == {v: len(eval_starts(videos[v][0].shape[0], task)) for v in videos if int(v[1:]) >= 17}


def test_epochs_reshuffle_shards_without_new_footer_reader_actors(tmp_path, ray_session):
    """Ray Data 2.60's default parquet reader lists files by reading their footers on new
    FooterReader actors (32 by default) in every epoch; the manifest already lists our shards, so
    read_split reads the footers once. Files are still reshuffled per epoch, the same way per seed."""
    import logging

    from ray.data import DataContext
    from ray.util.state import list_actors

    from vis4mer.datasets.pipeline import PARQUET_LOGGER, read_split

    videos = make_videos(12, 3, 8, seed=4)
    uri = str(tmp_path / "shards")
    write(uri, videos, shard_bytes=700, row_group_bytes=350, format_version=1)  # read_parquet's path
    ds = open_dataset(uri)
    assert len(ds.shard_paths("train")) >= 6

    def footer_readers() -> int:
        return len(list_actors(filters=[("class_name", "=", "FooterReader")], limit=10_000,
                               raise_on_missing_output=False))

    def epoch_orders(seed: int) -> list[list[str]]:
        split = read_split(ds, "train", shuffle_files=True, seed=seed)
        return [[v for b in split.iter_batches(batch_size=None, batch_format="pyarrow")
                 for v in b.column("video_id").to_pylist()] for _ in range(3)]

    before = footer_readers()
    first = epoch_orders(seed=5)
    assert footer_readers() == before  # three epochs, no footer-reader processes
    assert all(sorted(order) == sorted(videos) for order in first)  # every video once an epoch
    assert len({tuple(o) for o in first}) > 1  # reshuffled between epochs
    assert epoch_orders(seed=5) == first  # and the same way for the same seed
    # the switch and the quieted logger are the caller's again afterwards
    assert DataContext.get_current().use_datasource_v2 is True
    assert logging.getLogger(PARQUET_LOGGER).level == logging.NOTSET


def test_format_2_epochs_reshuffle_videos_on_the_consumer(tmp_path, ray_session):
    """Format 2: Ray Data moves index rows; each epoch's order is a shuffle seeded by (seed, epoch),
    every video once, no parquet reading in Ray Data at all."""
    from vis4mer.datasets.pipeline import read_split, train_batches
    from vis4mer.datasets.reader import ShardReader

    videos = make_videos(12, 3, 8, seed=4)
    uri = str(tmp_path / "shards")
    _, task = write(uri, videos, shard_bytes=700)
    ds = open_dataset(uri)
    split, reader = read_split(ds, "train"), ShardReader(ds)

    def epoch_orders(seed: int) -> list[list[str]]:
        return [[v for b in train_batches(split, task, batch_size=4, seed=seed, epoch=e, drop_last=False,
                                          reader=reader, shuffle=True) for v in b["video_id"]] for e in range(3)]

    first = epoch_orders(seed=5)
    assert all(sorted(order) == sorted(videos) for order in first)
    assert len({tuple(o) for o in first}) == 3  # reshuffled between epochs
    assert epoch_orders(seed=5) == first and epoch_orders(seed=6) != first  # the same way for the same seed


def test_every_rank_gets_the_same_number_of_batches(tmp_path, ray_session):
    from vis4mer.datasets.pipeline import read_split, train_batches
    from vis4mer.datasets.reader import ShardReader

    videos = make_videos(13, 3, 8, seed=2)
    uri = str(tmp_path / "uneven")
    write(uri, videos, shard_bytes=1500, row_group_bytes=500)  # uneven shards
    ds = open_dataset(uri)
    its = read_split(ds, "train").streaming_split(2, equal=True)  # what Ray Train's DataConfig does
    reader = ShardReader(ds)
    import threading
    counts = [0, 0]

    def consume(rank):
        counts[rank] = sum(1 for _ in train_batches(its[rank], ds.task, batch_size=2, seed=0, epoch=0, reader=reader))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert counts[0] == counts[1] == 13 // 2 // 2  # 6 rows per rank, 3 full batches each


def test_shards_are_plain_parquet(tmp_path):
    videos = make_videos(4, 3, 8, seed=3)
    manifest, task = write(str(tmp_path / "d"), videos)
    t = pq.read_table(tmp_path / "d" / manifest.shards[0]["path"])
    assert t.schema.equals(shard_schema(task))
    # the three lines the format's docstring gives, plain pyarrow and numpy
    i, n = 0, t["num_frames"][0].as_py()
    x = np.frombuffer(t["features"][i].as_buffer(), "<f2").reshape(n, 3, 8)
    np.testing.assert_array_equal(x, videos[t["video_id"][i].as_py()][0])
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["tokens_per_frame"] == 3 and m["feature_dim"] == 8
    assert m["task"]["num_classes"] == 3 and m["extractor"] == {"name": "test"}
    assert {"path", "split", "rows", "bytes", "sha256"} <= set(m["shards"][0])


def test_synth_cli_writes_to_s3_and_verify_checks_it(s3_server, s3_bucket, tmp_path):
    bucket, fs = s3_bucket
    env_cmd = [*VIS4MER, "data"]
    out = subprocess.run(env_cmd + ["synth", f"s3://{bucket}/demo", "--videos", "12", "4", "4", "--frames", "16",
                                    "--endpoint-url", s3_server.endpoint], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(env_cmd + ["verify", f"s3://{bucket}/demo", "--endpoint-url", s3_server.endpoint],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok:" in out.stdout and "20 videos" in out.stdout, out.stderr
    # deterministic from the seed: the same command writes the same bytes
    subprocess.run(env_cmd + ["synth", str(tmp_path / "a"), "--videos", "12", "4", "4", "--frames", "16"], check=True,
                   timeout=120)
    m_local = json.loads((tmp_path / "a" / "manifest.json").read_text())
    m_s3 = json.loads(fs.cat(f"{bucket}/demo/manifest.json"))
    assert [s["sha256"] for s in m_local["shards"]] == [s["sha256"] for s in m_s3["shards"]]


def test_synthetic_tasks_defeat_mean_pooling():
    from vis4mer.datasets.synthetic import gap_clip, order_clip

    rng = np.random.default_rng(0)
    for make in (order_clip, gap_clip):
        clips = [make(rng, 128, 8) for _ in range(3000)]
        pooled = np.stack([c[0].mean(0) for c in clips])
        y = np.array([c[1] for c in clips], dtype=np.float64)
        # the best linear read-out of mean-pooled features explains almost none of the label
        X = np.c_[pooled, np.ones(len(y))]
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        r2 = 1 - ((X @ coef - y) ** 2).mean() / y.var()
        assert r2 < 0.02, (make.__name__, r2)


# --- errors: each names the culprit ------------------------------------------------------------


@pytest.fixture
def local_ds(tmp_path):
    videos = make_videos(8, 3, 8, seed=4)
    uri = str(tmp_path / "ds")
    manifest, task = write(uri, videos, shard_bytes=1500, row_group_bytes=500)
    return uri, manifest, task, tmp_path / "ds"


def test_missing_shard(local_ds):
    uri, manifest, _, root = local_ds
    (root / manifest.shards[1]["path"]).unlink()
    with pytest.raises(DatasetError, match=f"missing shard .*{manifest.shards[1]['path']}"):
        open_dataset(uri)


def test_truncated_shard(local_ds):
    uri, manifest, _, root = local_ds
    p = root / manifest.shards[0]["path"]
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=f"shard .*{manifest.shards[0]['path']}: .* bytes: expected .*truncated"):
        open_dataset(uri)


def test_corrupt_shard_same_size(local_ds):
    uri, manifest, _, root = local_ds
    p = root / manifest.shards[0]["path"]
    data = bytearray(p.read_bytes())
    first = pq.read_table(p)["features"][0].as_py()[:32]  # a video's raw values, as stored
    data[data.find(first) + 5] ^= 0xFF  # one flipped byte in the feature data: parquet still opens
    p.write_bytes(bytes(data))
    open_dataset(uri)  # sizes and footers look right
    with pytest.raises(DatasetError, match=f"shard .*{manifest.shards[0]['path']}: sha256 .* expected"):
        verify(uri)
    data[-10:] = b"x" * 10  # a broken footer: not parquet any more
    p.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=f"shard .*{manifest.shards[0]['path']}: not a readable parquet file"):
        open_dataset(uri)


def test_feature_dim_disagrees_with_manifest(local_ds):
    uri, _, _, root = local_ds
    m = json.loads((root / "manifest.json").read_text())
    m["feature_dim"] = m["task"]["feature_dim"] = 16
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match=r"schema large_binary of frames 3 x 8: expected .*feature_dim=16"):
        open_dataset(uri)


def _write_raw(root, task, rows, name="train-00000.parquet"):
    """A shard written around the writer's checks, with a manifest that matches its bytes."""
    import hashlib
    table = pa.table({"video_id": [r[0] for r in rows], "split": ["train"] * len(rows),
                      "num_frames": pa.array([r[1].shape[0] for r in rows], pa.int32()),
                      "label": pa.array([r[2] for r in rows], pa.int64()),
                      "features": features_to_binary([r[1] for r in rows])}, schema=shard_schema(task))
    pq.write_table(table, root / name)
    data = (root / name).read_bytes()
    from vis4mer.datasets.format import Manifest
    m = Manifest(task=task, extractor={}, shards=[{"path": name, "split": "train", "rows": len(rows),
                                                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}])
    (root / "manifest.json").write_text(m.to_json())


@pytest.mark.parametrize("bad", ["nan", "label"])
def test_bad_values_are_named(tmp_path, ray_session, bad):
    from vis4mer.datasets.pipeline import read_split, train_batches
    from vis4mer.datasets.reader import ShardReader

    task = get_task("synthetic_order", tokens_per_frame=3, feature_dim=8, window_frames=6, num_classes=3)
    x = np.zeros((6, 3, 8), np.float16)
    rows = [("good", x, 1), ("bad-video", x.copy(), 1)]
    if bad == "nan":
        rows[1][1][2, 1, 1] = np.nan
        match = "video bad-video: features contain NaN or inf"
    else:
        rows[1] = ("bad-video", x, 7)
        match = r"video bad-video: label 7: expected a class id in \[0, 3\)"
    _write_raw(tmp_path, task, rows)
    with pytest.raises(DatasetError, match=match):
        verify(str(tmp_path))
    ds = open_dataset(str(tmp_path))
    with pytest.raises(Exception, match=match):
        list(train_batches(read_split(ds, "train"), task, batch_size=2, seed=0, epoch=0, reader=ShardReader(ds)))


def test_writer_refuses_bad_input_and_leaves_nothing(tmp_path):
    videos = make_videos(5, 3, 8, seed=5)
    videos["v002"] = (videos["v002"][0][:, :, :4], 1)  # wrong feature dim mid-way
    with pytest.raises(DatasetError,
                       match=r"video v002: features of shape \(\d+, 3, 4\): expected \(frames >= 1, 3, 8\)"):
        write(str(tmp_path / "out"), videos, shard_bytes=500, row_group_bytes=100)
    assert not (tmp_path / "out").exists()  # the shards already written were removed


def test_missing_bucket_and_bad_endpoint(s3_server):
    with pytest.raises(DatasetError, match="s3://no-such-bucket/x/manifest.json: the bucket does not exist|not found"):
        open_dataset("s3://no-such-bucket/x", s3(s3_server))
    with pytest.raises(StorageError, match="endpoint_url 'localhost:9': expected http"):
        filesystems("s3://b/x", StorageOptions(endpoint_url="localhost:9"))
    with pytest.raises(StorageError, match="unsupported scheme 'hdfs'"):
        filesystems("hdfs://nn/x")


def test_wrong_credentials(tmp_path):
    """A second moto server with authentication on: a wrong secret is refused, named as such."""
    import boto3

    from tests.conftest import S3Server, free_port

    server = S3Server(free_port(), env={"INITIAL_NO_AUTH_ACTION_COUNT": "5"})  # the health probe + 4 IAM calls
    server.start()
    try:
        iam = boto3.client("iam", endpoint_url=server.endpoint, region_name="us-east-1",
                           aws_access_key_id="x", aws_secret_access_key="x")
        iam.create_user(UserName="u")
        policy = iam.create_policy(PolicyName="s3", PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="u", PolicyArn=policy)
        key = iam.create_access_key(UserName="u")["AccessKey"]
        import os
        old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        try:
            opts = StorageOptions(endpoint_url=server.endpoint)
            boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                         aws_access_key_id=key["AccessKeyId"],
                         aws_secret_access_key=key["SecretAccessKey"]).create_bucket(Bucket="authbucket")
            write("s3://authbucket/ok", make_videos(2, 3, 8, seed=6), opts)
            open_dataset("s3://authbucket/ok", opts)  # right credentials: fine
            os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong-secret"
            with pytest.raises(DatasetError,
                               match="s3://authbucket/ok/manifest.json: access denied: check the credentials"):
                open_dataset("s3://authbucket/ok", opts)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        server.stop()


def test_aggregation_per_video():
    task = get_task("lvu_genre")
    agg = VideoAggregator(task)
    logits = np.log(np.array([[0.6, 0.4, 0, 0], [0.1, 0.9, 0, 0], [0.45, 0.55, 0, 0], [0.1, 0.1, 0.7, 0.1]]) + 1e-12)
    agg.add(["a", "a", "a", "b"], logits, [0, 0, 0, 2])
    # summed softmax: a = (1.15, 1.85) -> class 1 (a majority vote would say 0)
    assert agg.predictions() == {"a": 1, "b": 2}
    assert agg.metric() == 0.5
    reg = VideoAggregator(get_task("lvu_view_count"))
    reg.add(["a", "a", "b"], np.array([[1.0], [3.0], [0.5]]), [2.0, 2.0, 0.0])
    assert reg.predictions() == {"a": 2.0, "b": 0.5} and reg.metric() == pytest.approx(0.125)


# --- format 2: features at storage speed ---------------------------------------------------------


def test_format_1_datasets_read_as_before(tmp_path, ray_session):
    """The same videos written in both formats give the same training and evaluation examples."""
    from vis4mer.datasets.pipeline import eval_videos, read_split, train_batches
    from vis4mer.datasets.reader import ShardReader

    videos = make_videos(9, 3, 8, seed=11)
    out = {}
    for version in (1, 2):
        uri = str(tmp_path / f"v{version}")
        manifest, task = write(uri, videos, format_version=version, split_of=lambda i: "train" if i < 6 else "val")
        assert manifest.format_version == version
        verify(uri)
        ds = open_dataset(uri)
        reader = ShardReader(ds) if version == 2 else None
        train = [(b["x"].clone(), b["y"]) for b in train_batches(read_split(ds, "train"), task, batch_size=3, seed=5,
                                                                 epoch=1, reader=reader)]
        evals = {v["video_id"]: v["x"].clone() for v in eval_videos(read_split(ds, "val"), task, reader)}
        out[version] = (train, evals)
    for (x1, y1), (x2, y2) in zip(out[1][0], out[2][0]):
        assert x1.dtype == x2.dtype == torch.float16 and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert out[1][1].keys() == out[2][1].keys() and all(torch.equal(out[1][1][k], out[2][1][k]) for k in out[1][1])


@pytest.mark.parametrize("frames", [1, 4, 6, 7, 13])
def test_windows_match_the_reference_sampling(tmp_path, frames):
    """The collate function's training windows and the device-side evaluation windows are the
    numpy reference's (`train_example`, `eval_examples`), for every sampling and clip length."""
    from vis4mer.datasets.pipeline import TrainCollate

    for name, kw in (("synthetic_order", dict(window_frames=6, eval_stride=2)),
                     ("breakfast", dict(window_frames=6)), ("lvu_genre", dict(window_frames=6))):
        task = get_task(name, tokens_per_frame=3, feature_dim=8, **kw)
        videos = {f"v{i}": (np.random.default_rng(i).standard_normal((frames + i % 3, 3, 8)).astype(np.float16), 1)
                  for i in range(4)}
        table = pa.table({"video_id": list(videos), "label": [1] * 4,
                          "num_frames": pa.array([x.shape[0] for x, _ in videos.values()], pa.int32()),
                          "features": features_to_binary([x for x, _ in videos.values()])})
        for seed, epoch in ((0, 0), (3, 7)):
            batch = TrainCollate(task, seed, epoch)(table)
            expected = np.stack([train_example(x, task, example_rng(seed, epoch, v)) for v, (x, _) in videos.items()])
            assert batch["x"].dtype == torch.float16 and np.array_equal(batch["x"].numpy(), expected)
        for x, _ in videos.values():
            cut = torch.cat(list(device_windows(torch.from_numpy(x), task, batch_size=2))).numpy()
            assert np.array_equal(cut, np.stack(list(eval_examples(x, task))))


def test_host_batches_are_reused_only_when_nothing_refers_to_them():
    from vis4mer.datasets.pipeline import HostBatches

    pool, shape = HostBatches(keep=2), (2, 3, 4)
    a, b = pool.take(shape), pool.take(shape)
    assert a.shape == b.shape == shape and a.dtype == torch.float16 and a.data_ptr() != b.data_ptr()
    a_ptr, view = a.data_ptr(), a[1]
    del a
    c = pool.take(shape)  # a's memory is still in use through the view; b's through b
    assert c.data_ptr() not in (a_ptr, b.data_ptr())
    c_ptr = c.data_ptr()
    del c
    assert pool.take(shape).data_ptr() == c_ptr  # nothing refers to c's memory: handed out again
    del view
    assert pool.take((5, 1)).shape == (5, 1) and len(pool._pool) == 2  # at most `keep`: the oldest forgotten


def test_collated_batches_a_consumer_keeps_stay_as_they_were(tmp_path):
    """Batches come from reused memory: one still held when the next is collated is left alone."""
    from vis4mer.datasets.pipeline import TrainCollate

    task = get_task("lvu_genre", tokens_per_frame=3, feature_dim=8, window_frames=6)
    videos = make_videos(12, 3, 8, seed=4, frames=(6, 10))
    table = pa.table({"video_id": list(videos), "label": [y for _, y in videos.values()],
                      "num_frames": pa.array([x.shape[0] for x, _ in videos.values()], pa.int32()),
                      "features": features_to_binary([x for x, _ in videos.values()])})
    collate = TrainCollate(task, seed=1, epoch=2)
    kept = [collate(table.slice(i, 3)) for i in range(0, 12, 3)]
    for i, b in enumerate(kept):
        ids = list(videos)[3 * i : 3 * i + 3]
        expected = np.stack([train_example(videos[v][0], task, example_rng(1, 2, v)) for v in ids])
        assert b["video_id"] == ids and np.array_equal(b["x"].numpy(), expected)
    assert len({b["x"].data_ptr() for b in kept}) == 4


def _bad_value(tmp_path, how: str) -> str:
    task = get_task("synthetic_order", tokens_per_frame=3, feature_dim=8, window_frames=6, num_classes=3)
    x = np.zeros((6, 3, 8), np.float16)
    _write_raw(tmp_path, task, [("v1", x, 1), ("short-video", x, 1)])
    root = tmp_path
    m = json.loads((root / "manifest.json").read_text())
    if how == "v1-schema":  # a format-2 manifest over a format-1 shard
        import hashlib

        from vis4mer.datasets.format import features_to_arrow

        table = pa.table({"video_id": ["v1"], "split": ["train"], "num_frames": pa.array([6], pa.int32()),
                          "label": pa.array([1], pa.int64()), "features": features_to_arrow([x], 3, 8)},
                         schema=shard_schema(task, 1))
        pq.write_table(table, root / m["shards"][0]["path"])
        data = (root / m["shards"][0]["path"]).read_bytes()
        m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), rows=1)
        (root / "manifest.json").write_text(json.dumps(m))
        return "expected large_binary"
    t = pq.read_table(root / m["shards"][0]["path"])
    values = t["features"].to_pylist()
    values[1] = values[1][: -48 if how == "truncated" else -7]  # a frame short, or not whole frames
    import hashlib

    t = t.set_column(4, t.schema.field("features"), pa.array(values, pa.large_binary()))
    pq.write_table(t, root / m["shards"][0]["path"])
    data = (root / m["shards"][0]["path"]).read_bytes()
    m["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(m))
    return "video short-video: " + ("240 bytes" if how == "truncated" else "281 bytes")


@pytest.mark.parametrize("how", ["truncated", "wrong-length", "v1-schema"])
def test_bad_binary_values_are_one_line(tmp_path, how):
    from tests.support.cli import run_main

    (tmp_path / "d").mkdir()
    expected = _bad_value(tmp_path / "d", how)
    r = run_main(["data", "verify", str(tmp_path / "d")], tmp_path)
    assert r.code == 2 and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert expected in r.err, r.err


def _pyarrow_videos(ds, split: str) -> dict[str, np.ndarray]:
    """Every video of a split, read the plain way: pyarrow's table, numpy over the bytes."""
    out = {}
    for s in ds.shards(split):
        with ds.res.pa.open_input_file(ds.res.join(s["path"])) as f:
            t = pq.read_table(f)
        for vid, n, value in zip(t["video_id"].to_pylist(), t["num_frames"].to_pylist(), t["features"].to_pylist()):
            out[vid] = np.frombuffer(value, "<f2").reshape(n, ds.task.tokens_per_frame, ds.task.feature_dim)
    return out


@pytest.mark.parametrize("where", ["local", "s3", "s3-cache"])
@pytest.mark.parametrize("tokens,dim,frames", [(1, 1, (1, 3)), (3, 8, (5, 12)), (7, 5, (1, 40)),
                                               (197, 16, (2, 9)), (2, 1024, (60, 70))])
def test_the_direct_read_is_pyarrows_read(tmp_path, s3_server, s3_bucket, where, tokens, dim, frames):
    """The reader's fast path (a video's bytes taken straight from the file, datasets/reader.py) is
    what pyarrow reads, for every writer layout's shape, from a memory map and from range requests;
    and it is the path taken for the writer's shards."""
    from vis4mer.datasets.cache import ShardCache
    from vis4mer.datasets.reader import ShardReader, _direct_read, video_index

    videos = make_videos(7, tokens, dim, seed=tokens * dim, frames=frames)
    task = get_task("synthetic_order", tokens_per_frame=tokens, feature_dim=dim, window_frames=1, num_classes=3)
    uri, opts = (str(tmp_path / "d"), None) if where == "local" else (f"s3://{s3_bucket[0]}/d", s3(s3_server))
    write(uri, videos, opts, task=task, shard_bytes=3 * 2 * tokens * dim * frames[1],  # a few shards
          row_group_bytes=2 * tokens * dim * frames[1])
    ds = open_dataset(uri, opts)
    reader = ShardReader(ds, ShardCache(str(tmp_path / "cache"), 2**30) if where == "s3-cache" else None)
    expected = _pyarrow_videos(ds, "train")
    rows = video_index(ds, "train").to_pylist()
    assert len(rows) == 7 and any(r["row_group"] > 0 for r in rows)  # videos after the first in a file
    for r in rows:
        x = reader.video(r["shard"], r["row_group"], r["row"], r["video_id"], r["num_frames"])
        assert x.dtype == np.float16 and np.array_equal(x.view(np.uint16), expected[r["video_id"]].view(np.uint16))
        f, footer, mapped = reader._source(r["shard"])
        assert _direct_read(f, footer, mapped, r["row_group"], r["row"], x.nbytes) is not None
        assert (mapped is not None) == (where != "s3")


@pytest.mark.parametrize("how", ["truncated", "wrong-length"])
def test_the_reader_names_a_value_of_the_wrong_length(tmp_path, how):
    """Whatever the layout, a value that does not hold the index's frames is the error naming it."""
    from vis4mer.datasets.reader import ShardReader, video_index

    expected = _bad_value(tmp_path, how)
    ds = open_dataset(str(tmp_path))
    reader = ShardReader(ds)
    rows = {r["video_id"]: r for r in video_index(ds, "train").to_pylist()}
    r = rows["short-video"]
    with pytest.raises(DatasetError, match=expected):
        reader.video(r["shard"], r["row_group"], r["row"], "short-video", 6)
    r = rows["v1"]
    assert reader.video(r["shard"], r["row_group"], r["row"], "v1", r["num_frames"]).shape == (6, 3, 8)


# --- the node-local shard cache ------------------------------------------------------------------


def _gets(proxy) -> int:
    return sum(1 for r in proxy.requests if r.startswith("GET "))


def test_shard_cache_fetches_once_and_refetches_a_corrupt_copy(s3_server, s3_bucket, tmp_path):
    """A shard comes from object storage once per node: a second read, another worker on the node (a
    thread here: the lock is a file lock, shared by processes too) and a later process read the local
    copy; a copy changed on disk is detected by its hash and fetched again."""
    import threading

    from tests.support.servers import TcpProxy
    from vis4mer.datasets import cache as shard_cache

    bucket, _ = s3_bucket
    proxy = TcpProxy(s3_server.port)
    proxy.up()
    try:
        uri = f"s3://{bucket}/c"
        opts = StorageOptions(endpoint_url=proxy.endpoint)
        write(uri, make_videos(6, 3, 8, seed=2), opts)
        ds = open_dataset(uri, opts)
        (s,) = ds.manifest.shards
        cache = shard_cache.ShardCache(str(tmp_path / "cache"), max_bytes=2**30)
        before = _gets(proxy)
        paths = []
        threads = [threading.Thread(target=lambda: paths.append(
            cache.fetch(ds.res.pa, ds.res.join(s["path"]), s["sha256"], s["bytes"]))) for _ in range(2)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
        assert len(paths) == 2 and paths[0] == paths[1] and paths[0].read_bytes() == (
            filesystems(uri, opts).pa.open_input_file(ds.res.join(s["path"])).read())
        fetched = _gets(proxy) - before
        assert fetched >= 1
        shard_cache._verified.clear()  # as a new worker process: hashes the copy, fetches nothing
        cache.fetch(ds.res.pa, ds.res.join(s["path"]), s["sha256"], s["bytes"])
        assert _gets(proxy) - before == fetched
        data = bytearray(paths[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        paths[0].write_bytes(bytes(data))  # corrupt, same size, new mtime
        cache.fetch(ds.res.pa, ds.res.join(s["path"]), s["sha256"], s["bytes"])
        assert _gets(proxy) - before > fetched  # fetched again
        assert hashlib_of(paths[0]) == s["sha256"]
    finally:
        proxy.close()


def hashlib_of(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_second_epoch_through_the_disk_cache_reads_no_object_store_bytes(s3_server, s3_bucket, tmp_path,
                                                                           ray_session):
    from tests.support.servers import TcpProxy
    from vis4mer.datasets.cache import ShardCache
    from vis4mer.datasets.pipeline import read_split, train_batches
    from vis4mer.datasets.reader import ShardReader

    bucket, _ = s3_bucket
    proxy = TcpProxy(s3_server.port)
    proxy.up()
    try:
        uri = f"s3://{bucket}/e"
        opts = StorageOptions(endpoint_url=proxy.endpoint)
        videos = make_videos(12, 3, 8, seed=6)
        _, task = write(uri, videos, opts, shard_bytes=2000)
        ds = open_dataset(uri, opts)
        per_epoch, before = [], _gets(proxy)
        # (Ray Data may already read a sample of a shard while it plans the read: through the cache too)
        cache = ShardCache(str(tmp_path / "cache"), max_bytes=2**30)
        split, reader = read_split(ds, "train", cache=cache), ShardReader(ds, cache)
        for epoch in range(2):
            n = sum(len(b["y"]) for b in train_batches(split, task, batch_size=4, seed=0, epoch=epoch, drop_last=False,
                                                       reader=reader))
            per_epoch.append((n, _gets(proxy) - before))
            before = _gets(proxy)
        assert per_epoch[0][0] == per_epoch[1][0] == 12
        assert per_epoch[0][1] >= len(ds.manifest.shards) and per_epoch[1][1] == 0, per_epoch
    finally:
        proxy.close()


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=40), st.booleans())
def test_read_text_returns_the_text_or_names_the_file(tmp_path_factory, data, on_fsspec):
    """Any bytes: the file's UTF-8 text without a leading byte-order mark (newlines as Python's text
    mode reads them), or one UserError naming the file; the same through fsspec's local filesystem as
    through a plain path."""
    import fsspec

    path = tmp_path_factory.mktemp("text") / "labels.csv"
    path.write_bytes(data)
    fs = fsspec.filesystem("file") if on_fsspec else None
    try:
        expected = data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(UserError, match=f"^{re.escape(str(path))}: not a text file") as e:
            read_text(str(path), "label file", fs=fs)
        assert "\n" not in str(e.value)
        return
    universal = expected.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")  # text mode's newlines
    assert read_text(str(path), "label file", fs=fs) == universal


@pytest.mark.parametrize("on_fsspec", [False, True])
def test_read_text_names_a_missing_file_and_a_folder(tmp_path, on_fsspec):
    import fsspec

    fs = fsspec.filesystem("file") if on_fsspec else None
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'no.csv'))}: no such label file$"):
        read_text(str(tmp_path / "no.csv"), "label file", fs=fs)
    with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path))}: is a folder; expected a label file$"):
        read_text(str(tmp_path), "label file", fs=fs)
