"""Feature ingest into a Ray Train worker's loop, against the machine's limits, at the LVU shape.

    ../shared/tools/loopback .venv/bin/python benchmarks/ingest.py [--videos 24] [--epochs 3]

Writes `--videos` videos of 64..90 one-second frames (197 x 1024 float16 tokens per frame, as the
released LVU features) with the project's writer: in shard format 1 (nested lists) and format 2
(raw bytes) to a local folder, and in format 2 to a moto S3 server it starts on 127.0.0.1. Then,
for each variant, a TorchTrainer with one worker runs the project's training input (read_split +
train_batches: one random 60-s window per video, float16 batches of 4) with the model step
replaced by nothing, for --epochs epochs after a warm-up one, and reports what reached the loop:
clips/s and GB/s of windows (60 x 197 x 1024 x 2 bytes each), the median epoch.

    v1-local     format 1 from local disk (today's datasets before format 2)
    v2-local     format 2 from local disk
    v2-s3        format 2 from S3 (moto), every epoch from the object store
    v2-s3-cache  format 2 from S3 through the node's disk cache (data.cache=disk), warm

In the same run, the limits: memcpy of the same bytes (numpy, one thread), a raw read of the local
shard files (page cache warm), and a raw read of the S3 objects (pyarrow, as the cache fetches).
Each figure is printed as a ratio of memcpy (and the S3 ones of the raw S3 read). The worker's
peak RSS is compared with the README's formula. JSON and a PNG in benchmarks/results/.
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

from vis4mer.datasets.format import DatasetWriter, open_dataset  # noqa: E402
from vis4mer.datasets.storage import StorageOptions  # noqa: E402
from vis4mer.datasets.tasks import get_task  # noqa: E402

BATCH = 4
WINDOW_BYTES = 60 * 197 * 1024 * 2


def write_lvu_shaped(uri: str, n: int, storage: StorageOptions | None, version: int, seed: int = 0) -> None:
    task = get_task("lvu_genre")
    rng = np.random.default_rng(seed)
    with DatasetWriter(uri, task, {"name": "random", "preprocessing": "none"}, storage=storage,
                       shard_bytes=256 * 2**20, row_group_bytes=32 * 2**20, overwrite=True,
                       format_version=version) as w:
        for i in range(n):
            frames = int(rng.integers(64, 91))
            x = rng.standard_normal((frames, 197, 1024), dtype=np.float32).astype(np.float16)
            w.add(f"v{i:05d}", x, int(rng.integers(0, 4)), "train")


def memcpy_gbps(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    src = np.ones(nbytes, np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def raw_read_gbps(ds, repeats: int = 3, range_bytes: int | None = None) -> float:
    """Every shard's bytes read through the dataset's own filesystem (the page cache or the S3 server
    is the limit): a local file into one reused buffer (memory the process already has: a fresh
    buffer would add the kernel's zeroing of new pages), an object whole or in range requests of
    `range_bytes` (a video's size: what a reader of single videos asks for); the best of `repeats`."""
    buf = np.empty(64 * 2**20, np.uint8)
    best = 0.0
    for _ in range(repeats):
        t0, n = time.perf_counter(), 0
        for s in ds.shards("train"):
            with ds.res.pa.open_input_file(ds.res.join(s["path"])) as f:
                if range_bytes is None and ds.res.scheme == "file":
                    while (got := f.readinto(buf)) > 0:
                        n += got
                elif range_bytes is None:  # one GET of the object (moto serves a range at the object's cost)
                    n += len(f.read())
                else:
                    n += sum(len(f.read_at(min(range_bytes, s["bytes"] - o), o))
                             for o in range(0, s["bytes"], range_bytes))
        best = max(best, n / (time.perf_counter() - t0) / 1e9)
    return best


def ingest_loop(config: dict) -> None:
    """The Train worker: the project's training input with the model step left out."""
    import resource

    import ray.train

    from vis4mer.datasets.pipeline import train_batches
    from vis4mer.datasets.tasks import TaskSpec

    task = TaskSpec.from_dict(config["task"])
    it = ray.train.get_dataset_shard("train")
    for epoch in range(config["epochs"] + 1):
        t0, clips = time.perf_counter(), 0
        for b in train_batches(it, task, BATCH, seed=0, epoch=epoch, drop_last=False, reader=config["reader"],
                               shuffle=True):
            clips += b["x"].shape[0]
        m = {"epoch": epoch, "time_s": time.perf_counter() - t0, "clips": clips,
             "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}
        with open(config["log"], "a") as f:  # this machine's benchmark: the driver reads the file
            f.write(json.dumps(m) + "\n")
        ray.train.report(m)


def train_ingest(ds, epochs: int, storage_path: str, cache=None) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    from vis4mer.datasets.pipeline import read_split
    from vis4mer.datasets.reader import ShardReader

    log = f"{storage_path}/ingest-{time.time_ns()}.jsonl"
    os.makedirs(storage_path, exist_ok=True)
    reader = ShardReader(ds, cache) if ds.manifest.format_version >= 2 else None
    TorchTrainer(ingest_loop, train_loop_config={"task": ds.task.to_dict(), "epochs": epochs, "log": log,
                                                 "reader": reader},
                 scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(name=f"ingest-{time.time_ns()}", storage_path=storage_path),
                 datasets={"train": read_split(ds, "train", cache=cache)}).fit()
    history = [json.loads(line) for line in open(log)]
    steady = [m for m in history if m["epoch"] > 0]  # epoch 0: warm-up (workers, imports, the cache's fill)
    t = statistics.median(m["time_s"] for m in steady)
    clips = steady[0]["clips"]
    return {"clips": clips, "epoch_times_s": [m["time_s"] for m in history], "time_s": t,
            "clips_per_s": clips / t, "GB_per_s": clips * WINDOW_BYTES / t / 1e9,
            "worker_max_rss_gb": max(m["max_rss_gb"] for m in history)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()

    import ray
    from ray.data import DataContext

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", RAY_AUTH_MODE="disabled",
                      RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    from tests.support.servers import S3Server, free_port
    from vis4mer.datasets.cache import ShardCache

    server = S3Server(free_port())
    server.start()
    results: dict = {}
    try:
        storage = StorageOptions(endpoint_url=server.endpoint)
        import s3fs

        s3fs.S3FileSystem(key="bench", secret="bench", endpoint_url=server.endpoint).mkdir("bench")
        with tempfile.TemporaryDirectory() as tmp:
            data = {"v1-local": (f"{tmp}/v1", None, 1), "v2-local": (f"{tmp}/v2", None, 2),
                    "v2-s3": ("s3://bench/v2", storage, 2)}
            for name, (uri, st, version) in data.items():
                t0 = time.time()
                write_lvu_shaped(uri, a.videos, st, version)
                print(f"wrote {a.videos} LVU-shaped videos, format {version}, {name} in {time.time() - t0:.1f} s",
                      flush=True)
            sets = {name: open_dataset(uri, st) for name, (uri, st, _) in data.items()}
            limits = {"memcpy_GB_per_s": memcpy_gbps(), "local_read_GB_per_s": raw_read_gbps(sets["v2-local"]),
                      "s3_read_GB_per_s": raw_read_gbps(sets["v2-s3"]),
                      "s3_range_read_GB_per_s": raw_read_gbps(sets["v2-s3"], range_bytes=30 * 2**20)}
            print(f"limits: memcpy {limits['memcpy_GB_per_s']:.2f} GB/s, local read "
                  f"{limits['local_read_GB_per_s']:.2f} GB/s, S3 read {limits['s3_read_GB_per_s']:.2f} GB/s whole, "
                  f"{limits['s3_range_read_GB_per_s']:.2f} GB/s in 30-MB ranges",
                  flush=True)
            ray.init(address="local", num_cpus=4, object_store_memory=3 * 2**30, include_dashboard=False,
                     log_to_driver=False, logging_level="ERROR")
            DataContext.get_current().enable_progress_bars = False
            runs = {"v1-local": (sets["v1-local"], None), "v2-local": (sets["v2-local"], None),
                    "v2-s3": (sets["v2-s3"], None),
                    "v2-s3-cache": (sets["v2-s3"], ShardCache(f"{tmp}/cache", max_bytes=8 * 2**30))}
            for name, (ds, cache) in runs.items():
                r = train_ingest(ds, a.epochs, f"{tmp}/runs", cache)
                r["x_memcpy"] = r["GB_per_s"] / limits["memcpy_GB_per_s"]
                if name.startswith("v2-s3"):
                    r["x_raw_s3_read"] = r["GB_per_s"] / limits["s3_read_GB_per_s"]
                    r["x_raw_s3_range_read"] = r["GB_per_s"] / limits["s3_range_read_GB_per_s"]
                results[name] = r
                print(f"{name:12s} {r['clips_per_s']:7.2f} clips/s {r['GB_per_s']:6.3f} GB/s = "
                      f"{r['x_memcpy']:.3f}x memcpy" + (f", {r['x_raw_s3_read']:.2f}x the raw S3 read "
                                                        f"({r['x_raw_s3_range_read']:.2f}x in ranges)"
                                                        if "x_raw_s3_read" in r else "")
                      + f"; worker peak RSS {r['worker_max_rss_gb']:.2f} GB", flush=True)
            results["v2_over_v1"] = results["v2-local"]["GB_per_s"] / results["v1-local"]["GB_per_s"]
            video_gb = max(s["bytes"] / s["rows"] for s in sets["v2-local"].shards("train")) / 1e9
            results["memory_formula_gb"] = {
                "two_batches": 2 * BATCH * WINDOW_BYTES / 1e9,
                "videos_in_flight": 2 * video_gb * max(s["rows"] for s in sets["v2-local"].shards("train")),
                "note": "2 batches + 2 blocks of videos (the one being cut and the one prefetched), plus the "
                        "process's own torch/Ray footprint"}
            print(f"format 2 over format 1 (local): {results['v2_over_v1']:.1f}x", flush=True)
    finally:
        ray.shutdown()
        server.stop()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ingest.json").write_text(json.dumps({"videos": a.videos, "epochs": a.epochs, "batch": BATCH,
                                                   "limits": limits, "results": results}, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if isinstance(results[n], dict) and "GB_per_s" in results[n]]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = [results[n]["GB_per_s"] for n in names] + [limits["local_read_GB_per_s"], limits["s3_read_GB_per_s"],
                                                      limits["memcpy_GB_per_s"]]
    labels = names + ["raw local read", "raw S3 read", "memcpy"]
    ax.bar(range(len(bars)), bars, color=["C0"] * len(names) + ["C7"] * 3)
    ax.set_xticks(range(len(bars)), labels, rotation=20, fontsize=8)
    ax.set(ylabel="GB/s into the training loop", title="LVU-shaped ingest into a Ray Train worker")
    fig.tight_layout()
    fig.savefig(a.out / "ingest.png", dpi=120)
    print(f"wrote {a.out}/ingest.{{json,png}}")


if __name__ == "__main__":
    main()
