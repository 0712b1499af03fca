"""Throughput of the Transformer encoder stage's two halves: decoding (PyAV) and encoding (ViT-L/16).

    .venv/bin/python benchmarks/extract.py [--device cpu|cuda] [--frames 4] [--batch 2]

Decode: a synthetic H.264 clip (--seconds at --fps, --width x --height, written with PyAV into a
temporary folder) decoded with datasets.video three ways: every frame without conversion (the
codec's raw speed), 1 frame per second resized to 224x224 (ViT sampling), and every frame resized
(Video Swin's 32-frame segments). Reported as decoded frames/s, sampled frames/s and seconds of
video per second.

Encode: ViT-L/16 (randomly initialised: speed does not depend on the weights) on --frames frames of
224x224 in batches of --batch, fp32 as `vis4mer extract` runs it; the median of --repeats timed runs
after one warm-up. Reported as frames/s and achieved GFLOP/s. With --device cuda also fp16 autocast.

The ratio (video seconds decoded per second) / (video seconds encoded per second at 1 frame/s) says
which half bounds the ViT job on this machine. JSON and a PNG in benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vis4mer.datasets.encoders import VIT_ARCHS, Encoder, EncoderSpec, vit_flops_per_frame  # noqa: E402
from vis4mer.datasets.storage import filesystems  # noqa: E402
from vis4mer.datasets.video import Sampling, iter_chunks  # noqa: E402


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
                      lambda: 32 * sum(len(x) for x in iter_chunks(res, res.path, Sampling("segments"), 2)))]:
        times, n = [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            n = fn()
            times.append(time.perf_counter() - t)
        dt = statistics.median(times)
        out[name] = {"frames": n, "time_s": dt, "frames_per_s": n / dt, "video_s_per_s": seconds / dt}
        print(f"  decode  {name:40s} {n:5d} frames  {n / dt:8.1f} frames/s  {seconds / dt:7.1f} video-s/s", flush=True)
    return out


def bench_encode(device: str, frames: int, batch: int, repeats: int, autocast: bool) -> dict:
    import torch

    enc = Encoder(EncoderSpec(arch="large"), device=device, batch=batch)
    x = np.random.default_rng(0).integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8)

    def run():
        if autocast:
            with torch.autocast("cuda", dtype=torch.float16):
                y = enc.encode(x)
        else:
            y = enc.encode(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return y

    assert run().shape == (frames, 197, 1024)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    flops = vit_flops_per_frame(VIT_ARCHS["large"]) * frames
    r = {"device": device, "autocast_fp16": autocast, "frames": frames, "batch": batch, "time_s": dt,
         "frames_per_s": frames / dt, "gflops_per_s": flops / dt / 1e9, "implementation": enc.implementation,
         "torch_threads": torch.get_num_threads()}
    print(f"  encode  ViT-L/16 {device}{' fp16' if autocast else ' fp32'} batch {batch}: {frames / dt:8.2f} frames/s "
          f"({r['gflops_per_s']:.0f} GFLOP/s, {enc.implementation})", flush=True)
    return r


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"decode:\n{k}" for k in result["decode"]] + \
            [f"encode:\nViT-L/16 {e['device']}{' fp16' if e['autocast_fp16'] else ''}" for e in result["encode"]]
    vals = [v["video_s_per_s"] for v in result["decode"].values()] + [e["frames_per_s"] for e in result["encode"]]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.barh(range(len(vals)), vals, color=["tab:blue"] * len(result["decode"]) + ["tab:orange"] * len(result["encode"]))
    ax.set_yticks(range(len(vals)), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds of video per second (encode: 1 frame = 1 s at LVU's 1 frame/s)")
    ax.set_title(f"extract throughput ({result['machine']}, load average {result['load_average_1min']:.1f})",
                 fontsize=9)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--frames", type=int, default=4, help="frames per encode run (cuda: use more, e.g. 256)")
    p.add_argument("--batch", type=int, default=2, help="frames per forward (cuda: e.g. 64)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()
    import torch

    machine = f"{os.cpu_count()} CPUs" + (f", {torch.cuda.get_device_name()}" if a.device == "cuda" else "")
    print(f"extract benchmark on {machine} (load average {os.getloadavg()[0]:.1f}); "
          f"clip {a.seconds} s at {a.fps} fps, {a.width}x{a.height} H.264", flush=True)
    with tempfile.TemporaryDirectory() as d:
        clip = os.path.join(d, "clip.mp4")
        write_clip(clip, a.seconds, a.fps, a.width, a.height)
        decode = bench_decode(clip, a.seconds, a.repeats)
    encode = [bench_encode(a.device, a.frames, a.batch, a.repeats, autocast=False)]
    if a.device == "cuda":
        encode.append(bench_encode(a.device, a.frames, a.batch, a.repeats, autocast=True))
    vit_decode = decode["1 frame/s -> 224x224 (vit)"]["video_s_per_s"]
    ratios = {f"decode(1 frame/s) / encode({e['device']}{' fp16' if e['autocast_fp16'] else ''})":
              vit_decode / e["frames_per_s"] for e in encode}
    for k, v in ratios.items():
        print(f"  ratio {k}: {v:.0f}x  -> the {'encoder' if v > 1 else 'decoder'} bounds the ViT job", flush=True)
    result = {"machine": machine, "platform": platform.platform(), "torch": torch.__version__,
              "load_average_1min": os.getloadavg()[0], "clip": {"seconds": a.seconds, "fps": a.fps,
              "width": a.width, "height": a.height, "codec": "h264"}, "decode": decode, "encode": encode,
              "ratios": ratios}
    a.out.mkdir(parents=True, exist_ok=True)
    tag = a.device
    (a.out / f"extract-{tag}.json").write_text(json.dumps(result, indent=2))
    plot(result, a.out / f"extract-{tag}.png")
    print(f"wrote {a.out}/extract-{tag}.{{json,png}}")


if __name__ == "__main__":
    main()
