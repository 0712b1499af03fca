"""GPU check: what vis4mer does on one GPU, in at most 8 minutes, as JSON and a short table.

    bash benchmarks/gpu_check.sh                          # every section -> benchmarks/results/gpu_check-gpu.{json,md}
    python benchmarks/gpu_check.py --sections model --out /tmp/gpu
    python benchmarks/gpu_check.py --smoke                # the same steps on CPU at toy sizes (< 1 min here)

Needs Python and PyTorch >= 2.11 (a CUDA build), numpy and pyarrow (timm and torchvision for the
encoders when present; their plain-PyTorch twins otherwise), nothing installed from this repository,
and neither Ray, MLflow, omegaconf nor fsspec: it imports vis4mer.model, the Ray-free half of
vis4mer.datasets (format, reader, windows, tasks, encoders) and benchmarks/extract.py's
`encoder_throughput`. `vis4mer` is a namespace package made of this checkout's top-level folders
(pyproject.toml maps `vis4mer.model` to `model/`), so without an install the script registers a
`vis4mer` module whose `__path__` is the checkout's root, and `import vis4mer.model` then loads
`model/` from here (the JSON says which: environment.vis4mer_import).

Sections (`--sections a,b`, one function each, run in this order; each gets its share of
--budget-s, BUDGET_SHARE, plus what the ones before left unused):

* model:    ViS4mer (eager, and torch.compile'd) against the same-size pure self-attention model
            (`vis4mer.model.SelfAttentionBaseline`, sdpa, and naive until it runs out of memory) at
            the LVU shape (B x 11820 x 1024): batch 16, then doubling to the largest batch that
            fits. Per run: the training step's time (forward, backward, AdamW; bf16 autocast on
            CUDA), peak GPU memory, clips/s and model FLOP utilisation against the GPU's dense
            bf16 peak, with the paper's claims (2.63x faster, 8x less memory than pure
            self-attention) beside the measured ratios.
* fed_step: the training step fed by the data path: LVU-shaped format-2 shards written to a local
            temporary folder, indexed and read with vis4mer.datasets.reader (memory-mapped), one
            random window per video cut as training does (datasets/windows.py), into pinned
            buffers on a background thread two batches ahead, copied non_blocking, then forward,
            backward and fused AdamW (compiled, bf16 autocast) for --fed-steps steps: clips/s and
            the fraction of the time the step waited for its batch.
* encoders: ViT-L/16 and Video Swin-B frames/s in bf16, randomly initialised, the project's Encoder
            (uint8 frames in, preprocessing, forward, float16 tokens back on the host).

`--smoke` runs the same steps on the CPU at toy sizes (a one-stage vis4mer_tiny, batches 2 to 8;
24 small videos; the tiny encoder archs) in fp32 and eager for the fed step, and writes the same
JSON keys; it checks the script, it measures nothing of interest.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import platform
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "mlflow", "omegaconf", "fsspec")  # what a bare GPU machine does not have
PAPER = {"speedup_vs_self_attention": 2.63, "memory_ratio_vs_self_attention": 8.0}  # ViS4mer, ECCV 2022
# Dense bf16 peaks (TFLOP/s) by GPU name, first match wins; other GPUs: a large bf16 matmul, measured
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0))


VIS4MER_IMPORT = None  # how vis4mer was found: "installed", or "checkout namespace" (registered here)


def import_vis4mer_model() -> types.ModuleType:
    """`vis4mer.model` from this checkout, installed or not (see the module docstring)."""
    global VIS4MER_IMPORT
    if "vis4mer" not in sys.modules and importlib.util.find_spec("vis4mer") is not None:
        VIS4MER_IMPORT = "installed"
    elif "vis4mer" not in sys.modules:
        VIS4MER_IMPORT = "checkout namespace"
        namespace = types.ModuleType("vis4mer")
        namespace.__path__ = [str(ROOT)]  # vis4mer.<folder> -> <checkout>/<folder>
        sys.modules["vis4mer"] = namespace
    return importlib.import_module("vis4mer.model")


@dataclass
class Check:
    """What every section gets: the device, the mode, its deadline (`main` sets one per section) and a log."""

    device: torch.device
    smoke: bool
    deadline: float
    fed_steps: int | None = None  # None: the section's default (200; smoke 20)
    fed_batch: int | None = None  # None: 16

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, msg: str) -> None:
        print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# section: model
# --------------------------------------------------------------------------------------------

MODELS = ("vis4mer", "vis4mer-compiled", "attention-sdpa", "attention-naive")


def section_model(chk: Check) -> dict:
    vm = import_vis4mer_model()
    cuda = chk.device.type == "cuda"
    if chk.smoke:  # one stage: a compile of a few seconds, not the half minute of the full structure
        cfg = vm.variant_config("vis4mer_tiny", n_layers=1)
        batches, max_batch = [2], 8
    else:
        cfg = vm.variant_config("vis4mer_lvu")  # 11820 x 1024, 3 stages, 4 classes
        batches, max_batch = [16], 1024
    peak = _bf16_peak(chk.device)
    out = {"status": "ok", "shape": {"length": cfg.l_max, "d_input": cfg.d_input, "d_model": cfg.d_model,
                                     "n_layers": cfg.n_layers, "num_classes": cfg.num_classes},
           "precision": "bf16 autocast" if cuda else "fp32", "peak": peak, "runs": [], "largest_batch": {}}
    flops_cache: dict[str, float] = {}
    for name in MODELS:
        model, step = _training_step(vm, cfg, name, chk.device)
        batch, fits, need = batches[0], None, 60.0  # need: seconds the next run is expected to take
        while True:
            if chk.left() < need:
                out["runs"].append({"model": name, "batch": batch, "status": "skipped: time budget"})
                break
            r = _measure(model, step, name, batch, cfg, chk, flops_cache, peak)
            out["runs"].append(r)
            chk.log(_run_line(r))
            if r["status"] != "ok":
                break
            fits, need = batch, 2 * (r["first_step_s"] + 6 * r["step_s"]) + 5  # twice the batch next
            if batch * 2 > max_batch:
                out["runs"][-1]["note"] = f"largest batch tried: {max_batch} (cap)"
                break
            batch *= 2
        out["largest_batch"][name] = fits
        del model, step
        _free(chk.device)
    out["comparison"] = _comparison(out["runs"], batches[0])
    return out


def _training_step(vm, cfg, name: str, device: torch.device):
    """(model, step(x, y) -> None): forward, backward and AdamW, bf16 autocast on CUDA."""
    torch.manual_seed(0)
    if name.startswith("vis4mer"):
        model = vm.ViS4mer(cfg)
    else:
        model = vm.SelfAttentionBaseline(cfg, impl=name.split("-")[1])
    model = model.to(device).train()
    run = torch.compile(model) if name.endswith("-compiled") else model
    opt = torch.optim.AdamW(vm.param_groups(model, lr=1e-4, weight_decay=0.01), fused=device.type == "cuda")

    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def _measure(model, step, name, batch, cfg, chk: Check, flops_cache: dict, peak: dict) -> dict:
    dev = chk.device
    r = {"model": name, "batch": batch}
    try:
        x = torch.randn(batch, cfg.l_max, cfg.d_input, device=dev)
        y = torch.randint(0, cfg.num_classes, (batch,), device=dev)
        if name.endswith("-compiled"):
            torch._dynamo.mark_dynamic(x, 0)  # one compilation for every batch size
            torch._dynamo.mark_dynamic(y, 0)
        _sync(dev)
        t0 = time.perf_counter()
        step(x, y)  # warm-up (and, compiled, the compilation)
        _sync(dev)
        r["first_step_s"] = time.perf_counter() - t0
        _reset_peak(dev)
        times = []
        for _ in range(3 if chk.smoke else 5):
            t0 = time.perf_counter()
            step(x, y)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        r |= {"status": "ok", "step_s": statistics.median(times), "peak_memory_bytes": _peak(dev),
              "memory_kind": "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "process peak RSS"}
        r["clips_per_s"] = batch / r["step_s"]
        key = name.removesuffix("-compiled")
        if key not in flops_cache:  # per example, counted once per architecture, on its eager model
            flops_cache[key] = _model_flops(model, x[:1], y[:1])
        r["model_flops_per_step"] = flops_cache[key] * batch
        r["mfu"] = r["model_flops_per_step"] / r["step_s"] / (peak["tflops"] * 1e12)
    except torch.OutOfMemoryError:
        r |= {"status": "OOM"}
    except RuntimeError as e:  # CPU allocations that fail, or a compile error: reported, not fatal
        r |= {"status": "OOM" if "alloc" in str(e).lower() else "error", "error": str(e).splitlines()[0][:300]}
    finally:
        x = y = None
        _free(dev)
    return r


def _model_flops(model, x, y) -> float:
    """Forward+backward FLOPs of one example, counted by FlopCounterMode (matmuls and attention;
    the S4 kernel's contraction runs in a custom op and is not counted, nor are FFTs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _comparison(runs: list[dict], batch: int) -> dict:
    """The paper's claims beside what this GPU measured at the common batch (ratios against
    eager and compiled ViS4mer), and at each model's largest batch in clips/s."""
    at = {r["model"]: r for r in runs if r["batch"] == batch and r.get("status") == "ok"}
    measured = {}
    for vis in ("vis4mer", "vis4mer-compiled"):
        for att in ("attention-sdpa", "attention-naive"):
            key = f"{att}_vs_{vis}"
            if vis in at and att in at:
                measured[key] = {"speedup": at[att]["step_s"] / at[vis]["step_s"],
                                 "memory_ratio": at[att]["peak_memory_bytes"] / at[vis]["peak_memory_bytes"]}
            else:
                status = {m: next((r["status"] for r in runs if r["model"] == m and r["batch"] == batch), "absent")
                          for m in (vis, att)}
                measured[key] = {"status": f"not measured at batch {batch} ({status})"}
    best = {}
    for r in runs:
        if r.get("status") == "ok" and r["clips_per_s"] > best.get(r["model"], {}).get("clips_per_s", 0):
            best[r["model"]] = {"batch": r["batch"], "clips_per_s": r["clips_per_s"]}
    return {"batch": batch, "paper": PAPER, "measured": measured, "best_throughput": best}


def _bf16_peak(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"tflops": _measured_matmul_tflops(dev, torch.float32, 1024), "source": "measured fp32 matmul (CPU)",
                "gpu": platform.processor() or "cpu"}
    name = torch.cuda.get_device_name(dev)
    measured = _measured_matmul_tflops(dev, torch.bfloat16, 8192)
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return {"tflops": tflops, "source": f"table ({key})", "gpu": name, "measured_matmul_tflops": measured}
    return {"tflops": measured, "source": "measured bf16 matmul", "gpu": name, "measured_matmul_tflops": measured}


def _measured_matmul_tflops(dev: torch.device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(dev)
    reps = 20 if dev.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _run_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"  {r['model']:18s} batch {r['batch']:5d}  {r['status']}"
    return (f"  {r['model']:18s} batch {r['batch']:5d}  {r['step_s'] * 1e3:9.1f} ms/step  "
            f"{r['clips_per_s']:8.1f} clips/s  {r['peak_memory_bytes'] / 2**30:7.2f} GiB  MFU {100 * r['mfu']:5.1f}%")


# --------------------------------------------------------------------------------------------
# section: fed_step
# --------------------------------------------------------------------------------------------


def import_vis4mer(module: str) -> types.ModuleType:
    """`vis4mer.<module>` from this checkout (see `import_vis4mer_model`)."""
    import_vis4mer_model()  # registers the namespace when vis4mer is not installed
    return importlib.import_module(f"vis4mer.{module}")


def write_v2_shards(folder: Path, task, n_videos: int, frames: tuple[int, int], seed: int = 0,
                    shard_bytes: int = 256 * 2**20) -> dict:
    """A format-2 dataset of `n_videos` train videos of frames[0]..frames[1] frames, written with
    pyarrow as datasets/format.py's DatasetWriter writes it (its schema, one video a row group,
    statistics on the small columns, then the manifest). Not DatasetWriter itself: it checks its
    target through fsspec, which a bare GPU machine need not have. Returns sizes and the labels."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    fmt = import_vis4mer("datasets.format")
    storage = import_vis4mer("datasets.storage")
    rng = np.random.default_rng(seed)
    schema = fmt.shard_schema(task, 2)
    # one random block, each video a different rotation of it: distinct data without generating
    # gigabytes of random numbers (speed does not depend on the values)
    base = rng.standard_normal((frames[1], task.tokens_per_frame, task.feature_dim), np.float32).astype("<f2")
    folder.mkdir(parents=True, exist_ok=True)
    shards, labels, total, writer, path, rows = [], {}, 0, None, None, 0

    def close():
        writer.close()
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                h.update(block)
        shards.append({"path": path.name, "split": "train", "rows": rows, "bytes": path.stat().st_size,
                       "sha256": h.hexdigest()})

    for i in range(n_videos):
        if writer is None:
            path, rows = folder / f"train-gpucheck-{len(shards):05d}.parquet", 0
            writer = pq.ParquetWriter(path, schema, **fmt.shard_writer_options(2))
        f = int(rng.integers(frames[0], frames[1] + 1))
        x = np.roll(base, int(rng.integers(0, frames[1])), axis=0)[:f]
        vid, label = f"video-{i:05d}", int(rng.integers(0, task.num_classes))
        row = {"video_id": pa.array([vid], pa.string()), "split": pa.array(["train"], pa.string()),
               "num_frames": pa.array([f], pa.int32()), "label": pa.array([label], pa.int64()),
               "features": fmt.features_to_binary([x])}
        writer.write_table(pa.table(row, schema=schema), row_group_size=1)  # one video a row group
        labels[vid], rows, total = label, rows + 1, total + x.nbytes
        if path.stat().st_size >= shard_bytes:
            close()
            writer = None
    if writer is not None:
        close()
    manifest = fmt.Manifest(task=task, extractor={"name": "gpu_check", "seed": seed}, shards=shards)
    fmt.publish_manifest(storage.filesystems(str(folder)), manifest.to_json())
    return {"videos": n_videos, "shards": len(shards), "feature_bytes": total, "labels": labels}


READ_THREADS = 4  # videos of a batch read at once, as datasets/pipeline.py's training input does


class _Prefetcher:
    """Training batches made on a background thread, `depth` ahead of the step: index rows in a
    seeded order per epoch, each video read with the project's ShardReader (memory-mapped), one
    random window per video cut into a pinned buffer (`windows.train_example`, the training input's
    own sampling). Buffers are reused: one goes back to the pool only once its copy to the device
    has finished (a CUDA event), so the copy can run non_blocking."""

    def __init__(self, ds, index, task, batch: int, steps: int, device, depth: int = 2, seed: int = 0):
        import concurrent.futures
        import queue
        import threading

        import numpy as np

        reader_mod, windows = import_vis4mer("datasets.reader"), import_vis4mer("datasets.windows")
        self.reader = reader_mod.ShardReader(ds)
        self.rows = index.to_pylist()
        self.task, self.batch, self.steps, self.device, self.seed = task, batch, steps, device, seed
        self._windows, self._np = windows, np
        pin = device.type == "cuda"
        self.free: queue.Queue = queue.Queue()
        for _ in range(depth + 2):  # depth queued, one in the step, one being filled
            x = torch.empty(batch, task.seq_len, task.feature_dim, dtype=torch.float16, pin_memory=pin)
            self.free.put((x, None))
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.pool = concurrent.futures.ThreadPoolExecutor(READ_THREADS)
        self.videos_read = self.bytes_read = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _order(self):
        epoch = 0
        while True:
            perm = self._np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            for i in range(0, len(perm) - self.batch + 1, self.batch):  # drop_last
                yield epoch, [self.rows[j] for j in perm[i : i + self.batch]]
            epoch += 1

    def _fill(self, x: torch.Tensor, epoch: int, rows: list[dict]) -> None:
        w = self._windows
        out = x.numpy()

        def one(i_row):
            i, r = i_row
            video = self.reader.video(r["shard"], r["row_group"], r["row"], r["video_id"], r["num_frames"])
            self._np.copyto(out[i], w.train_example(video, self.task, w.example_rng(self.seed, epoch, r["video_id"])))
            return video.nbytes

        self.bytes_read += sum(self.pool.map(one, enumerate(rows)))
        self.videos_read += len(rows)

    def _run(self) -> None:
        try:
            order = self._order()
            for _ in range(self.steps):
                epoch, rows = next(order)
                x, done = self.free.get()
                if done is not None:
                    done.synchronize()  # its last copy to the device has finished
                self._fill(x, epoch, rows)
                y = torch.tensor([r["label"] for r in rows], dtype=torch.long)
                self.ready.put((x, y, [r["video_id"] for r in rows]))
        except BaseException as e:  # handed to the consumer, which raises it
            self.error = e
            self.ready.put(None)

    def get(self):
        item = self.ready.get()
        if item is None:
            raise RuntimeError(f"data thread failed: {type(self.error).__name__}: {self.error}") from self.error
        return item

    def give_back(self, x: torch.Tensor) -> None:
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        self.free.put((x, done))


def section_fed_step(chk: Check) -> dict:
    """The training step fed by the data path: v2 shards on local disk -> ShardReader -> windows ->
    pinned batch -> non_blocking copy -> forward, backward, AdamW. Clips/s and the fraction of the
    time the step waited for its batch."""
    import tempfile

    vm = import_vis4mer_model()
    tasks, fmt = import_vis4mer("datasets.tasks"), import_vis4mer("datasets.format")
    cuda = chk.device.type == "cuda"
    if chk.smoke:  # vis4mer_tiny's shape: 64 frames x 4 tokens of 64
        task = tasks.get_task("lvu_genre", tokens_per_frame=4, window_frames=64, feature_dim=64)
        cfg = vm.variant_config("vis4mer_tiny", n_layers=1, num_classes=task.num_classes)
        n_videos, frames, batch = 24, (64, 96), 4
    else:  # LVU: 60 frames x 197 tokens of 1024, ~1.1 GB of shards
        task = tasks.get_task("lvu_genre")
        cfg = vm.variant_config("vis4mer_lvu", num_classes=task.num_classes)
        n_videos, frames, batch = 36, (60, 90), chk.fed_batch or 16
    steps, warmup = chk.fed_steps or (20 if chk.smoke else 200), 3
    assert cfg.l_max == task.seq_len and cfg.d_input == task.feature_dim
    out = {"status": "ok", "task": task.name, "shape": {"length": task.seq_len, "d_input": task.feature_dim},
           "batch": batch, "steps": steps, "warmup_steps": warmup, "compiled": cuda,
           "precision": "bf16 autocast" if cuda else "fp32"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_shards_") as tmp:
        t0 = time.perf_counter()
        written = write_v2_shards(Path(tmp), task, n_videos, frames)
        out["write_s"] = time.perf_counter() - t0
        labels = written.pop("labels")
        out["dataset"] = written
        ds = fmt.open_dataset(tmp)
        index = import_vis4mer("datasets.reader").video_index(ds, "train")
        assert index.num_rows == n_videos, (index.num_rows, n_videos)
        torch.manual_seed(0)
        model = vm.ViS4mer(cfg).to(chk.device).train()
        run = torch.compile(model) if cuda else model
        opt = torch.optim.AdamW(vm.param_groups(model, lr=1e-4, weight_decay=0.01), fused=cuda)
        feed = _Prefetcher(ds, index, task, batch, steps, chk.device)
        waited = clips = 0.0
        seen: set[str] = set()
        wrong_labels = 0
        start = None
        for i in range(steps):
            if i == warmup:
                _sync(chk.device)
                start, waited, clips = time.perf_counter(), 0.0, 0
            t = time.perf_counter()
            x_host, y_host, ids = feed.get()
            waited += time.perf_counter() - t
            wrong_labels += sum(labels[v] != int(y) for v, y in zip(ids, y_host))
            seen.update(ids)
            x = x_host.to(chk.device, non_blocking=True).float()  # the model's input dtype; autocast takes it on
            y = y_host.to(chk.device, non_blocking=True)
            feed.give_back(x_host)
            with torch.autocast(chk.device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = torch.nn.functional.cross_entropy(run(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(chk.device)  # the step's own time, so that waiting for data is not hidden by queued work
            clips += batch
            if i == 0:
                out["first_step_s"] = time.perf_counter() - t
            if chk.left() < 0 and i >= warmup + 5:
                out["note"] = f"stopped after {i + 1} steps: time budget"
                break
        wall = time.perf_counter() - start
        measured = i + 1 - warmup
        out |= {"steps_run": i + 1, "measured_steps": measured, "clips_seen": (i + 1) * batch,
                "distinct_videos": len(seen), "videos_read": feed.videos_read, "bytes_read": feed.bytes_read,
                "wrong_labels": wrong_labels, "loss": loss.detach().item(), "step_s": wall / measured,
                "clips_per_s": clips / wall, "data_wait_fraction": waited / wall,
                "prefetch_depth": 2, "pinned": cuda}
        feed.pool.shutdown()
        del model, run, opt, feed
    _free(chk.device)
    return out


# --------------------------------------------------------------------------------------------
# section: encoders
# --------------------------------------------------------------------------------------------


def section_encoders(chk: Check) -> dict:
    """ViT-L/16 (224x224 frames) and Video Swin-B (32-frame segments) frames/s in bf16, randomly
    initialised, through benchmarks/extract.py's `encoder_throughput` (the project's Encoder: uint8
    frames in, its preprocessing, forward, float16 tokens back on the host). Smoke: the tiny archs."""
    import importlib.util

    import_vis4mer_model()  # the vis4mer namespace, for extract.py's `vis4mer.datasets.encoders`
    spec = importlib.util.spec_from_file_location("vis4mer_benchmarks_extract", ROOT / "benchmarks" / "extract.py")
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    arch = "tiny" if chk.smoke else "large"
    device = "cpu" if chk.smoke else f"cuda:{chk.device.index or 0}"
    batches = {"vit": 2, "swin": 1} if chk.smoke else {"vit": 128, "swin": 8}  # swin: segments of 32 frames
    seconds = 0.5 if chk.smoke else 10.0
    out = {"status": "ok", "dtype": "bfloat16", "arch": arch, "runs": []}
    for extractor in ("vit", "swin"):
        if chk.left() < (5 if chk.smoke else 30):
            out["runs"].append({"extractor": extractor, "status": "skipped: time budget"})
            continue
        try:
            r = extract.encoder_throughput(extractor, device, "bfloat16", batches[extractor], seconds, arch=arch)
            r["status"] = "ok"
        except torch.OutOfMemoryError:
            r = {"extractor": extractor, "batch": batches[extractor], "status": "OOM"}
        out["runs"].append(r)
        if r["status"] == "ok":
            chk.log(f"  {r['model']:28s} batch {r['batch']:4d}  {r['frames_per_s']:9.1f} frames/s  "
                    f"{r['tflops_per_s']:7.1f} TFLOP/s")
        extract._ENCODERS.clear()
        _free(chk.device)
    return out


SECTIONS = {"model": section_model, "fed_step": section_fed_step, "encoders": section_encoders}
BUDGET_SHARE = {"model": 0.55, "fed_step": 0.3, "encoders": 0.15}  # of --budget-s


# --------------------------------------------------------------------------------------------
# devices, output
# --------------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        try:  # Linux: resets the process's peak RSS (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def environment(dev: torch.device, smoke: bool) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(dev), "smoke": smoke,
           "cuda": torch.version.cuda, "hostname": platform.node()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env |= {"gpu": p.name, "gpu_memory_bytes": p.total_memory, "gpu_count": torch.cuda.device_count()}
    return env


def table(result: dict) -> str:
    lines = [f"# GPU check ({result['environment'].get('gpu', result['environment']['device'])}, "
             f"torch {result['environment']['torch']}{', smoke' if result['environment']['smoke'] else ''})", ""]
    for name, sec in result["sections"].items():
        if sec.get("status") != "ok":
            lines += [f"## {name}: {sec.get('status')} {sec.get('error', '')}".rstrip(), ""]
            continue
        if name == "fed_step":
            d = sec["dataset"]
            lines += [f"## fed_step: {sec['task']} shards on local disk ({d['videos']} videos, "
                      f"{d['feature_bytes'] / 2**30:.2f} GiB) -> ShardReader -> windows -> pinned -> "
                      f"{'compiled ' if sec['compiled'] else ''}step, {sec['precision']}", "",
                      "| batch | steps | step | clips/s | waiting for data |", "| ---: | ---: | ---: | ---: | ---: |",
                      f"| {sec['batch']} | {sec['measured_steps']} | {sec['step_s'] * 1e3:.1f} ms | "
                      f"{sec['clips_per_s']:.1f} | {100 * sec['data_wait_fraction']:.1f}% |", ""]
            continue
        if name == "encoders":
            lines += [f"## encoders: {sec['dtype']}, random weights", "", "| encoder | batch | frames/s | TFLOP/s |",
                      "| --- | ---: | ---: | ---: |"]
            for r in sec["runs"]:
                if r["status"] == "ok":
                    lines.append(f"| {r['model']} | {r['batch']} | {r['frames_per_s']:.1f} | {r['tflops_per_s']:.1f} |")
                else:
                    lines.append(f"| {r['extractor']} | {r.get('batch', '')} | {r['status']} | |")
            lines.append("")
            continue
        s = sec["shape"]
        lines += [f"## model: {s['length']} x {s['d_input']} tokens, {sec['precision']}, peak "
                  f"{sec['peak']['tflops']:.3g} TFLOP/s ({sec['peak']['source']})", "",
                  "| model | batch | step | clips/s | peak memory | MFU |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in sec["runs"]:
            if r["status"] == "ok":
                lines.append(f"| {r['model']} | {r['batch']} | {r['step_s'] * 1e3:.1f} ms | {r['clips_per_s']:.1f} | "
                             f"{r['peak_memory_bytes'] / 2**30:.2f} GiB | {100 * r['mfu']:.1f}% |")
            else:
                lines.append(f"| {r['model']} | {r['batch']} | {r['status']} | | | |")
        c = sec["comparison"]
        lines += ["", f"Against pure self-attention at batch {c['batch']} (the paper: ViS4mer "
                  f"{PAPER['speedup_vs_self_attention']}x faster, {PAPER['memory_ratio_vs_self_attention']:g}x "
                  "less memory):", ""]
        for key, v in c["measured"].items():
            lines.append(f"* {key}: " + (f"{v['speedup']:.2f}x the time, {v['memory_ratio']:.2f}x the memory"
                                         if "speedup" in v else v["status"]))
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    p.add_argument("--smoke", action="store_true", help="the same steps on CPU at toy sizes")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="where gpu_check-{gpu,smoke}.{json,md} go")
    p.add_argument("--budget-s", type=float, default=450.0, help="seconds for all sections together")
    p.add_argument("--fed-steps", type=int, default=None, help="fed_step: training steps (default 200; smoke 20)")
    p.add_argument("--fed-batch", type=int, default=None, help="fed_step: clips per step (default 16; smoke 4)")
    a = p.parse_args(argv)
    names = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {', '.join(unknown)}: expected some of {', '.join(SECTIONS)}")
    if a.smoke:
        dev = torch.device("cpu")
    elif torch.cuda.is_available():
        dev = torch.device("cuda", 0)
    else:
        p.error("no CUDA GPU visible to torch; --smoke runs the same steps on CPU")
    t0 = time.monotonic()
    chk = Check(dev, a.smoke, t0 + a.budget_s, a.fed_steps, a.fed_batch)
    result = {"script": "gpu_check", "version": 1, "environment": environment(dev, a.smoke), "sections": {}}
    for i, name in enumerate(names):
        chk.log(f"[{name}]")
        s0 = time.monotonic()
        # each section its share of what is left (time a section leaves unused goes to the next ones):
        # the model sweep alone would otherwise fill the whole budget doubling its batch
        shares = [BUDGET_SHARE[n] for n in names[i:]]
        chk.deadline = s0 + (t0 + a.budget_s - s0) * shares[0] / sum(shares)
        try:
            sec = SECTIONS[name](chk)
        except Exception as e:  # one section failing leaves the others' results
            sec = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
        if sec["status"] != "not implemented":
            sec["elapsed_s"] = time.monotonic() - s0
        result["sections"][name] = sec
    result["elapsed_s"] = time.monotonic() - t0
    result["environment"]["heavy_modules_loaded"] = sorted(m for m in HEAVY if m in sys.modules)
    result["environment"]["vis4mer_import"] = VIS4MER_IMPORT
    if "vis4mer.model" in sys.modules:
        result["environment"]["vis4mer_model_from"] = str(Path(sys.modules["vis4mer.model"].__file__).parent)
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if a.smoke else "gpu"
    (a.out / f"gpu_check-{tag}.json").write_text(json.dumps(result, indent=2, default=str))
    text = table(result)
    (a.out / f"gpu_check-{tag}.md").write_text(text + "\n")
    print("\n" + text + f"\nwrote {a.out}/gpu_check-{tag}.{{json,md}} in {result['elapsed_s']:.0f} s", flush=True)
    return 0 if all(s["status"] in ("ok", "not implemented") for s in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
