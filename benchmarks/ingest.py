"""Ray Data ingest against plain pyarrow, on shards of LVU shape, from local disk and from S3.

    ../shared/tools/loopback .venv/bin/python benchmarks/ingest.py [--videos 24] [--epochs 3]

Writes `--videos` videos of 64..90 one-second frames (197 x 1024 float16 tokens per frame, as the
released LVU features) with the project's writer, to a local folder and to a moto S3 server it
starts on 127.0.0.1 (stopped by PID at the end). Then, per storage, it times one epoch of training
examples (one random 60-s window per video, the paper's sampling) two ways, in the same run:
  * plain:    pyarrow reads each shard's row groups in turn; windows cut with datasets.windows
  * ray-data: the project's pipeline: read_parquet + iter_torch_batches with the window collate
Reports clips/s and GB/s (shard bytes read per second), the median over --epochs after a warm-up,
and the ratio ray-data / plain. JSON and a PNG in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vis4mer.datasets.format import DatasetWriter, open_dataset, video_features  # noqa: E402
from vis4mer.datasets.storage import StorageOptions  # noqa: E402
from vis4mer.datasets.tasks import get_task  # noqa: E402
from vis4mer.datasets.windows import example_rng, train_example  # noqa: E402


def write_lvu_shaped(uri: str, n: int, storage: StorageOptions | None, seed: int = 0) -> None:
    task = get_task("lvu_genre")
    rng = np.random.default_rng(seed)
    with DatasetWriter(uri, task, {"name": "random", "preprocessing": "none"}, storage=storage,
                       shard_bytes=128 * 2**20, row_group_bytes=32 * 2**20, overwrite=True) as w:
        for i in range(n):
            frames = int(rng.integers(64, 91))
            x = rng.standard_normal((frames, 197, 1024), dtype=np.float32).astype(np.float16)
            w.add(f"v{i:05d}", x, int(rng.integers(0, 4)), "train")


def plain_epoch(ds, epoch: int) -> int:
    import pyarrow.parquet as pq

    task, clips = ds.task, 0
    for s in ds.shards("train"):
        with ds.res.pa.open_input_file(ds.res.join(s["path"])) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=4, columns=["video_id", "label", "features"]):
                ids = batch.column("video_id").to_pylist()
                xs = [train_example(x, task, example_rng(0, epoch, v))
                      for v, x in zip(ids, video_features(batch.column("features"), 197, 1024))]
                np.stack(xs)
                clips += len(xs)
    return clips


def ray_epoch(ds, epoch: int) -> int:
    from vis4mer.datasets.pipeline import read_split, train_batches

    return sum(b["x"].shape[0] for b in train_batches(read_split(ds, "train"), ds.task, batch_size=4, seed=0,
                                                         epoch=epoch, drop_last=False))


def measure(fn, ds, epochs: int) -> dict:
    fn(ds, 0)  # warm-up: page cache, Ray workers, imports
    times, clips = [], 0
    for e in range(1, epochs + 1):
        t0 = time.perf_counter()
        clips = fn(ds, e)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    nbytes = sum(s["bytes"] for s in ds.shards("train"))
    return {"clips": clips, "time_s": t, "times_s": times, "clips_per_s": clips / t, "GB_per_s": nbytes / t / 1e9}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()

    import ray
    from ray.data import DataContext

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", RAY_AUTH_MODE="disabled",
                      RAY_USAGE_STATS_ENABLED="0")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import S3Server, free_port

    server = S3Server(free_port())
    server.start()
    results = {}
    try:
        storage = StorageOptions(endpoint_url=server.endpoint)
        import s3fs
        s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=server.endpoint).mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            targets = {"local": (f"{tmp}/lvu", None), "s3": ("s3://bench/lvu", storage)}
            for name, (uri, st) in targets.items():
                t0 = time.time()
                write_lvu_shaped(uri, a.videos, st)
                print(f"wrote {a.videos} LVU-shaped videos to {name} in {time.time() - t0:.1f} s", flush=True)
            ray.init(address="local", num_cpus=4, object_store_memory=2 * 2**30, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
            DataContext.get_current().enable_progress_bars = False
            for name, (uri, st) in targets.items():
                ds = open_dataset(uri, st)
                r = {"plain": measure(plain_epoch, ds, a.epochs), "ray-data": measure(ray_epoch, ds, a.epochs)}
                r["ratio"] = r["ray-data"]["clips_per_s"] / r["plain"]["clips_per_s"]
                results[name] = r
                print(f"{name:6s} plain {r['plain']['clips_per_s']:7.1f} clips/s {r['plain']['GB_per_s']:.3f} GB/s | "
                      f"ray-data {r['ray-data']['clips_per_s']:7.1f} clips/s {r['ray-data']['GB_per_s']:.3f} GB/s | "
                      f"ratio {r['ratio']:.2f}x", flush=True)
    finally:
        ray.shutdown()
        server.stop()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ingest.json").write_text(json.dumps({"videos": a.videos, "epochs": a.epochs, "results": results},
                                                  indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(results)
    for i, impl in enumerate(("plain", "ray-data")):
        ax.bar([j + 0.38 * i for j in range(len(names))], [results[n][impl]["clips_per_s"] for n in names], 0.38,
               label=impl)
    ax.set_xticks([j + 0.19 for j in range(len(names))], names)
    ax.set(ylabel="60-s LVU clips / s", title="ingest: Ray Data vs plain pyarrow")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "ingest.png", dpi=120)
    print(f"wrote {a.out}/ingest.{{json,png}}")


if __name__ == "__main__":
    main()
