"""Feature shards on a real S3-protocol server (moto, loopback), read back through Ray Data."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support.runs import VIS4MER
from vis4mer.datasets.format import DatasetError, DatasetWriter, features_to_arrow, open_dataset, shard_schema, verify
from vis4mer.datasets.storage import StorageError, StorageOptions, filesystems
from vis4mer.datasets.tasks import get_task
from vis4mer.datasets.windows import VideoAggregator, eval_starts, example_rng, train_example

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
    from vis4mer.datasets.pipeline import eval_batches, read_split, train_batches

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
    for batch in read_split(ds, "train").iter_batches(batch_size=5, batch_format="pyarrow"):
        from vis4mer.datasets.format import video_features
        for vid, x in zip(batch.column("video_id").to_pylist(), video_features(batch.column("features"), 3, 8)):
            rows[vid] = x
    assert set(rows) == {f"v{i:03d}" for i in range(17)}
    for vid, x in rows.items():
        np.testing.assert_array_equal(x, videos[vid][0])

    # training examples: the windows the paper samples, from (seed, epoch, video) only
    got = {}
    for b in train_batches(read_split(ds, "train", shuffle_files=True, seed=3), task, batch_size=4, seed=7, epoch=2,
                           drop_last=False):
        assert b["x"].dtype.is_floating_point and b["x"].shape[1:] == (task.seq_len, 8)
        for x, y in zip(b["x"].numpy(), b["y"].tolist()):
            got.setdefault(y, []).append(x)
    expected = {}
    for vid in rows:
        x, y = videos[vid]
        expected.setdefault(y, []).append(train_example(x, task, example_rng(7, 2, vid)))
    for y in expected:
        assert sorted(map(bytes, map(np.ascontiguousarray, got[y]))) == sorted(map(bytes, expected[y]))

    # evaluation: every window at the stride, tagged with its video
    counts = {}
    for b in eval_batches(read_split(ds, "val"), task, batch_size=5):
        assert b["x"].shape[0] == len(b["video_id"]) <= 5
        for v in b["video_id"]:
            counts[v] = counts.get(v, 0) + 1
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
    write(uri, videos, shard_bytes=700, row_group_bytes=350)
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


def test_every_rank_gets_the_same_number_of_batches(tmp_path, ray_session):
    from vis4mer.datasets.pipeline import read_split, train_batches

    videos = make_videos(13, 3, 8, seed=2)
    uri = str(tmp_path / "uneven")
    write(uri, videos, shard_bytes=1500, row_group_bytes=500)  # uneven shards
    ds = open_dataset(uri)
    its = read_split(ds, "train").streaming_split(2, equal=True)  # what Ray Train's DataConfig does
    import threading
    counts = [0, 0]

    def consume(rank):
        counts[rank] = sum(1 for _ in train_batches(its[rank], ds.task, batch_size=2, seed=0, epoch=0))

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert counts[0] == counts[1] == 13 // 2 // 2  # 6 rows per rank, 3 full batches each


def test_shards_are_plain_parquet(tmp_path):
    videos = make_videos(4, 3, 8, seed=3)
    manifest, task = write(str(tmp_path / "d"), videos)
    t = pq.read_table(tmp_path / "d" / manifest.shards[0]["path"])
    assert t.schema.equals(shard_schema(task))
    first = t.slice(0, 1)
    x = np.asarray(first.column("features").combine_chunks().flatten().flatten()).reshape(-1, 3, 8)
    np.testing.assert_array_equal(x, videos[first.column("video_id")[0].as_py()][0])
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["tokens_per_frame"] == 3 and m["feature_dim"] == 8
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
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the feature data: parquet still opens
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
    with pytest.raises(DatasetError, match=r"schema list<.*fixed_size_list<.*24\]?.*expected .*48.*feature_dim=16"):
        open_dataset(uri)


def _write_raw(root, task, rows, name="train-00000.parquet"):
    """A shard written around the writer's checks, with a manifest that matches its bytes."""
    import hashlib
    table = pa.table({"video_id": [r[0] for r in rows], "split": ["train"] * len(rows),
                      "num_frames": pa.array([r[1].shape[0] for r in rows], pa.int32()),
                      "label": pa.array([r[2] for r in rows], pa.int64()),
                      "features": features_to_arrow([r[1] for r in rows], 3, 8)}, schema=shard_schema(task))
    pq.write_table(table, root / name)
    data = (root / name).read_bytes()
    from vis4mer.datasets.format import Manifest
    m = Manifest(task=task, extractor={}, shards=[{"path": name, "split": "train", "rows": len(rows),
                                                    "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}])
    (root / "manifest.json").write_text(m.to_json())


@pytest.mark.parametrize("bad", ["nan", "label"])
def test_bad_values_are_named(tmp_path, ray_session, bad):
    from vis4mer.datasets.pipeline import read_split, train_batches

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
        list(train_batches(read_split(ds, "train"), task, batch_size=2, seed=0, epoch=0))


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
