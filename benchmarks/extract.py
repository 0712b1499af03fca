"""Throughput of the Transformer encoder stage's two halves: decoding (PyAV) and encoding (ViT-L/16, Video Swin-B).

    .venv/bin/python benchmarks/extract.py                                   # CPU: a few minutes
    python benchmarks/extract.py --device cuda --dtypes float32,float16,bfloat16 --batches auto

Decode: a synthetic H.264 clip (--seconds at --fps, --width x --height, written with PyAV into a
temporary folder) decoded with vis4mer.datasets.video three ways: every frame without conversion (the
codec's raw speed), 1 frame per second resized to 224x224 (ViT sampling), and every frame resized
(Video Swin's 32-frame segments). Reported as decoded frames/s, sampled frames/s and seconds of
video per second.

Encode: `encoder_throughput` runs the encoders as `vis4mer extract` does (uint8 frames in, the
Encoder's preprocessing, forward, float16 tokens back on the host), randomly initialised (speed does
not depend on the weights): ViT-L/16 on 224x224 frames, Video Swin-B on 32-frame 224x224 segments,
for --seconds per measurement after a warm-up. Reported as items/s (frames or segments), frames/s
(a segment is 32 frames), achieved TFLOP/s and peak memory. float16/bfloat16 run under torch.autocast
(`vis4mer extract` itself runs float32).

Batch that fits: --batches auto doubles the batch from 1 until the device runs out of memory
(cuda: torch.cuda.OutOfMemoryError; up to --max-batch) or, on CPU, until --cpu-budget-s of
measuring is spent; on CPU the batch that fits in the machine's available memory is then
extrapolated from the measured peak RSS per item (the largest batch measured is reported apart).

`encoder_throughput(extractor, device, dtype, batch, seconds)` is a plain function for GPU check
scripts: it imports torch, numpy and vis4mer.datasets.encoders only (no Ray, MLflow, omegaconf or
fsspec). It needs vis4mer importable (`make install`, or `pip install --no-deps -e .` beside a torch).
JSON and a PNG in benchmarks/results/ (extract-<device>.{json,png}).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "float16", "bfloat16")
SEGMENT = 32  # frames per Video Swin item


# --- encoders (torch, numpy and vis4mer.datasets.encoders only) ----------------------------------------


def _rss_peak_reset() -> bool:
    """Resets the process's peak RSS (Linux: VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


_ENCODERS: dict[tuple, tuple] = {}  # (extractor, arch, device, dtype) -> (Encoder, memory right after building it)


def _encoder(extractor: str, arch: str, device: str, dtype: str):
    """One cached randomly initialised Encoder per setup (built once across batch sizes), and the
    memory in use just after building it (cuda: allocated bytes; cpu: RSS) as the base of peaks."""
    import torch

    from vis4mer.datasets.encoders import Encoder, EncoderSpec

    key = (extractor, arch, device, dtype)
    if key not in _ENCODERS:
        _ENCODERS.clear()  # one model at a time: ViT-L and Swin-B weights are 1.2 and 0.35 GB in float32
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        spec = EncoderSpec(extractor=extractor, preprocess="released" if extractor == "vit" else "model", arch=arch)
        enc = Encoder(spec, device=device, autocast=None if dtype == "float32" else getattr(torch, dtype))
        base = torch.cuda.memory_allocated(device) if device.startswith("cuda") else _rss_kib("VmRSS") * 1024
        _ENCODERS[key] = (enc, base)
    return _ENCODERS[key]


def encoder_throughput(extractor: str, device: str = "cpu", dtype: str = "float32", batch: int = 1,
                       seconds: float = 10.0, arch: str = "large", warmup: int = 1) -> dict:
    """Items/s of one encoder at one batch size: `extractor` vit (items = 224x224 frames) or swin
    (items = 32-frame 224x224 segments); `dtype` float32, or float16 / bfloat16 under torch.autocast.
    Runs `warmup` batches, then batches until `seconds` have passed (at least one); the time per
    batch is the median. Peak memory: above what the model itself holds (cuda: allocated; cpu: peak
    RSS, None where it cannot be reset). Raises torch.cuda.OutOfMemoryError when the batch does not
    fit on the GPU."""
    import torch

    from vis4mer.datasets.encoders import SWIN_ARCHS, VIT_ARCHS, swin_flops_per_segment, vit_flops_per_frame

    if extractor not in ("vit", "swin"):
        raise ValueError(f"extractor {extractor!r}: expected vit or swin")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    cuda = device.startswith("cuda")
    enc, base = _encoder(extractor, arch, device, dtype)
    enc.batch = batch
    shape = (batch, 224, 224, 3) if extractor == "vit" else (batch, SEGMENT, 224, 224, 3)
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    frames_per_item = 1 if extractor == "vit" else SEGMENT
    flops = (vit_flops_per_frame(VIT_ARCHS[arch]) if extractor == "vit"
             else swin_flops_per_segment(SWIN_ARCHS[arch]))

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = not cuda and _rss_peak_reset()
    try:
        for _ in range(max(0, warmup)):
            y = enc.encode(x)
        sync()
        times: list[float] = []
        start = time.perf_counter()
        while not times or time.perf_counter() - start < seconds:
            t = time.perf_counter()
            y = enc.encode(x)
            sync()
            times.append(time.perf_counter() - t)
    finally:
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) - base
            torch.cuda.empty_cache()
        else:
            peak = _rss_kib("VmHWM") * 1024 - base if rss_reset else None
    assert y.shape == (batch, enc.spec.tokens, enc.spec.dim) and y.dtype == np.float16
    dt = statistics.median(times)
    return {"extractor": extractor, "arch": arch, "model": enc.spec.describe()["name"], "device": device,
            "dtype": dtype, "batch": batch, "runs": len(times), "time_s": dt, "items_per_s": batch / dt,
            "frames_per_s": batch * frames_per_item / dt, "tflops_per_s": flops * batch / dt / 1e12,
            "gflops_per_item": flops / 1e9, "peak_memory_gib": None if peak is None else peak / 2**30,
            "implementation": enc.implementation, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")}


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("MemAvailable:")) / 2**20


def batch_sweep(extractor: str, device: str, dtype: str, batches: list[int] | None, seconds: float,
                max_batch: int, cpu_budget_s: float, arch: str = "large", log=print) -> dict:
    """Throughput per batch size; with `batches` None, doubling from 1 until out of memory (cuda),
    `max_batch`, or (cpu) `cpu_budget_s` of measuring. The batch that fits: the largest that ran
    (cuda), or 80% of the available memory over the measured peak per item (cpu, extrapolated)."""
    runs, oom_at = [], None
    sizes = batches or [2**i for i in range(32) if 2**i <= max_batch]
    started = time.perf_counter()
    for b in sizes:
        try:
            r = encoder_throughput(extractor, device, dtype, b, seconds, arch)
        except Exception as e:
            if not _is_oom(e):
                raise
            oom_at = b
            _ENCODERS.clear()
            log(f"  encode  {extractor} {device} {dtype} batch {b}: out of memory")
            break
        runs.append(r)
        mem = f", +{r['peak_memory_gib']:.2f} GiB peak" if r["peak_memory_gib"] is not None else ""
        log(f"  encode  {r['model']} {device} {dtype} batch {b:4d}: {r['items_per_s']:9.2f} "
            f"{'frames' if extractor == 'vit' else 'segments'}/s = {r['frames_per_s']:9.1f} frames/s "
            f"({r['tflops_per_s'] * 1e3:.0f} GFLOP/s{mem}, {r['implementation']})")
        if batches is None and not device.startswith("cuda") and time.perf_counter() - started > cpu_budget_s:
            break
    _ENCODERS.clear()
    best = max(runs, key=lambda r: r["items_per_s"]) if runs else None
    out = {"extractor": extractor, "device": device, "dtype": dtype, "runs": runs, "oom_at_batch": oom_at,
           "largest_batch_run": runs[-1]["batch"] if runs else None, "best": best}
    if device.startswith("cuda"):
        out["batch_fits"] = runs[-1]["batch"] if runs else 0
        out["batch_fits_how"] = (f"measured: batch {oom_at} ran out of memory" if oom_at else
                                 f"measured: every batch up to {sizes[-1]} ran")
        return out
    mem = [(r["batch"], r["peak_memory_gib"]) for r in runs if r["peak_memory_gib"] is not None]
    if mem:
        per_item = mem[-1][1] / mem[-1][0]  # one batch: peak / batch (an upper bound per item)
        if len(mem) >= 2:
            per_item = max((mem[-1][1] - mem[0][1]) / (mem[-1][0] - mem[0][0]), 1e-3)
        avail = _mem_available_gib()
        out.update(peak_gib_per_item=per_item, available_gib=avail, batch_fits=int(0.8 * avail / per_item),
                   batch_fits_how=(f"extrapolated: 80% of the {avail:.1f} GiB available / {per_item:.3f} GiB per item "
                                   f"(peak RSS slope over batches {', '.join(str(b) for b, _ in mem)})"))
    return out


# --- decoding --------------------------------------------------------------------------------------------


def write_clip(path: str, seconds: int, fps: int, w: int, h: int) -> None:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(seconds * fps):  # moving content: a rolled texture plus a little noise
            img = np.roll(base, 3 * i, axis=1)
            img[: h // 8] = rng.integers(0, 256, (h // 8, w, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def bench_decode(path: str, seconds: int, repeats: int) -> dict:
    import av

    from vis4mer.datasets.storage import filesystems
    from vis4mer.datasets.video import Sampling, iter_chunks

    def raw() -> int:
        with av.open(path) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            return sum(1 for _ in c.decode(st))

    res = filesystems(path)
    out = {}
    for name, fn in [("all frames, no conversion", raw),
                     ("1 frame/s -> 224x224 (vit)",
                      lambda: sum(len(x) for x in iter_chunks(res, res.path, Sampling("fps"), 64))),
                     ("all frames -> 224x224 (swin segments)",
                      lambda: SEGMENT * sum(len(x) for x in iter_chunks(res, res.path, Sampling("segments"), 2)))]:
        times, n = [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        out[name] = {"frames": n, "time_s": dt, "frames_per_s": n / dt, "video_s_per_s": seconds / dt}
        print(f"  decode  {name:40s} {n:5d} frames  {n / dt:8.1f} frames/s  {seconds / dt:7.1f} video-s/s", flush=True)
    return out


# --- report --------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, vals, colors = [], [], []
    for k, v in result["decode"].items():
        names.append(f"decode: {k}")
        vals.append(v["frames_per_s"])
        colors.append("tab:blue")
    for s in result["encode"]:
        for r in s["runs"]:
            names.append(f"encode: {r['model']} {r['dtype']} batch {r['batch']}")
            vals.append(r["frames_per_s"])
            colors.append("tab:orange" if r["extractor"] == "vit" else "tab:green")
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * len(vals)))
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("frames/s (decode: frames decoded; encode: input frames, a Swin segment = 32 frames)")
    ax.set_title(f"extract throughput ({result['machine']}, load average {result['load_average_1min']:.1f})",
                 fontsize=9)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ints(text: str) -> list[int] | None:
    return None if text == "auto" else [int(x) for x in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtypes", default="float32", help=f"comma-separated: {', '.join(DTYPES)}")
    p.add_argument("--extractors", default="vit,swin")
    p.add_argument("--batches", default="auto", help="comma-separated batch sizes, or auto (doubling until full)")
    p.add_argument("--max-batch", type=int, default=1024, help="auto: the largest batch tried")
    p.add_argument("--encode-seconds", type=float, default=5.0, help="timed seconds per measurement")
    p.add_argument("--cpu-budget-s", type=float, default=60.0, help="cpu, auto: stop doubling after this long")
    p.add_argument("--seconds", type=int, default=20, help="decode: clip length")
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--repeats", type=int, default=3, help="decode: timed runs (median)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()
    import torch

    cuda = a.device.startswith("cuda")
    machine = f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name(a.device)}" if cuda else "")
    print(f"extract benchmark on {machine} (load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}); "
          f"clip {a.seconds} s at {a.fps} fps, {a.width}x{a.height} H.264", flush=True)
    decode = {}
    if not a.no_decode:
        with tempfile.TemporaryDirectory() as d:
            clip = os.path.join(d, "clip.mp4")
            write_clip(clip, a.seconds, a.fps, a.width, a.height)
            decode = bench_decode(clip, a.seconds, a.repeats)
    encode = []
    for ex in a.extractors.split(","):
        for dt in a.dtypes.split(","):
            encode.append(batch_sweep(ex, a.device, dt, _ints(a.batches), a.encode_seconds,
                                      a.max_batch if ex == "vit" else max(1, a.max_batch // 8), a.cpu_budget_s,
                                      log=lambda s: print(s, flush=True)))
            s = encode[-1]
            if s.get("batch_fits") is not None:
                print(f"  encode  {ex} {dt}: batch that fits {s['batch_fits']} ({s['batch_fits_how']})", flush=True)
    ratios = {}
    if decode:
        for s in encode:
            if s["best"] is None:
                continue
            key = "1 frame/s -> 224x224 (vit)" if s["extractor"] == "vit" else "all frames -> 224x224 (swin segments)"
            # frames the decoder hands the encoder per second over frames the encoder takes per second
            ratios[f"decode / encode ({s['extractor']} {s['dtype']})"] = \
                decode[key]["frames_per_s"] / s["best"]["frames_per_s"]
        for k, v in ratios.items():
            print(f"  ratio {k}: {v:.2g}x  -> the {'encoder' if v > 1 else 'decoder (one process)'} bounds it",
                  flush=True)
    result = {"machine": machine, "platform": platform.platform(), "torch": torch.__version__,
              "load_average_1min": os.getloadavg()[0], "clip": {"seconds": a.seconds, "fps": a.fps,
              "width": a.width, "height": a.height, "codec": "h264"}, "decode": decode, "encode": encode,
              "ratios": ratios}
    a.out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    (a.out / f"extract-{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, a.out / f"extract-{tag}.png")
    print(f"wrote {a.out}/extract-{tag}.{{json,png}}")


if __name__ == "__main__":
    main()
