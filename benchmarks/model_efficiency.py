"""ViS4mer against its pure self-attention counterpart: forward+backward time and peak memory.

    .venv/bin/python benchmarks/model_efficiency.py                     # CPU, lengths 1024 .. 11820
    .venv/bin/python benchmarks/model_efficiency.py --device cuda --bf16
    .venv/bin/python benchmarks/model_efficiency.py --lengths 1024 4096 --max-mem 8

Batch 1, d_model 1024, the ViS4mer default stages (3 stages, pooling 2, width / 2). Every
(model, length) runs in its own subprocess so that its peak memory is its own: on CPU the peak
resident set size above the process's baseline after start-up (torch imported, nothing built), on
CUDA torch.cuda.max_memory_allocated. A subprocess that outgrows --max-mem (polled RSS on CPU, a
memory fraction on CUDA) or fails to allocate is reported as OOM with that limit. Results: a table
of ratios against ViS4mer at each length, JSON and a PNG plot in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("vis4mer", "attention-sdpa", "attention-naive")


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def child(args) -> None:
    """Runs one configuration and prints one JSON line."""
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from vis4mer.model import SelfAttentionBaseline, ViS4mer, ViS4merConfig

    dev = torch.device(args.device)
    if dev.type == "cuda" and args.max_mem:
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.max_mem * 2**30 / total), dev)
    base_rss = _rss_bytes(os.getpid())
    torch.manual_seed(0)
    cfg = ViS4merConfig(d_input=1024, d_model=1024, l_max=args.length, n_layers=3, num_classes=10)
    if args.model == "vis4mer":
        model = ViS4mer(cfg)
    else:
        model = SelfAttentionBaseline(cfg, impl=args.model.split("-")[1])
    model = model.to(dev).train()
    x = torch.randn(1, args.length, 1024, device=dev)
    y = torch.randint(0, 10, (1,), device=dev)
    times = []
    for i in range(args.repeats + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    print(json.dumps({"time_s": statistics.median(times), "times_s": times, "peak_bytes": peak}), flush=True)


def run_one(model: str, length: int, a) -> dict:
    cmd = [sys.executable, __file__, "--child", "--model", model, "--length", str(length),
           "--device", a.device, "--repeats", str(a.repeats), "--max-mem", str(a.max_mem),
           *(["--bf16"] if a.bf16 else [])]
    limit = int(a.max_mem * 2**30)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    over = False
    t0 = time.time()
    while proc.poll() is None:
        if a.device == "cpu" and _rss_bytes(proc.pid) > limit:
            over = True
            proc.kill()
            break
        if time.time() - t0 > a.timeout:
            proc.kill()
            out = {"status": "timeout", "limit_s": a.timeout}
            proc.wait()
            return out
        # not faster: on a 2-core machine a 50 Hz poller preempts one of the child's two compute
        # threads often enough to cost it ~15% (the other waits at each parallel region's barrier)
        time.sleep(0.25)
    out, err = proc.communicate()
    if over or "out of memory" in err.lower() or "can't allocate" in err.lower() or proc.returncode in (-9, 137):
        return {"status": "OOM", "limit_gib": a.max_mem}
    if proc.returncode != 0:
        return {"status": "error", "error": err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"}
    return {"status": "ok", **json.loads(out.strip().splitlines()[-1])}


def fmt(r: dict, base: dict | None, key: str) -> str:
    if r["status"] != "ok":
        return f"{r['status']} (>{r['limit_gib']:g} GiB)" if r["status"] == "OOM" else r["status"]
    v = r["time_s"] if key == "time" else r["peak_bytes"] / 2**30
    s = f"{v:.2f} s" if key == "time" else f"{v:.2f} GiB"
    if base and base["status"] == "ok" and base is not r:
        ratio = v / (base["time_s"] if key == "time" else base["peak_bytes"] / 2**30)
        s += f" ({ratio:.2f}x)"
    return s


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for model in MODELS:
        rows = [r for r in results if r["model"] == model and r["status"] == "ok"]
        oom = [r for r in results if r["model"] == model and r["status"] == "OOM"]
        for ax, key, scale in ((axes[0], "time_s", 1), (axes[1], "peak_bytes", 2**-30)):
            line, = ax.plot([r["length"] for r in rows], [r[key] * scale for r in rows], "o-", label=model)
            for r in oom:
                ax.axvline(r["length"], color=line.get_color(), ls=":", alpha=0.6)
    axes[0].set(xlabel="sequence length (tokens)", ylabel="forward+backward (s)", yscale="log", title="time")
    axes[1].set(xlabel="sequence length (tokens)", ylabel="peak memory (GiB)", yscale="log", title="memory")
    axes[0].legend(title="dotted: OOM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 11820])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--repeats", type=int, default=4, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--max-mem", type=float, default=16.0, help="GiB per configuration")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    results = []
    for length in a.lengths:
        for model in a.models:
            r = {"model": model, "length": length, **run_one(model, length, a)}
            results.append(r)
            print(f"  {model:16s} L={length:6d}  {r['status']}"
                  + (f"  {r['time_s']:.2f} s  {r['peak_bytes'] / 2**30:.2f} GiB" if r["status"] == "ok" else ""),
                  flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    tag = f"{a.device}{'-bf16' if a.bf16 else ''}"
    lines = [f"device={a.device} bf16={a.bf16} batch=1 d_model=1024; ratios are against ViS4mer at the same length",
             "", "| length | model | fwd+bwd time | peak memory |", "| ---: | --- | ---: | ---: |"]
    for length in a.lengths:
        base = next((r for r in results if r["length"] == length and r["model"] == "vis4mer"), None)
        for r in (r for r in results if r["length"] == length):
            lines.append(f"| {length} | {r['model']} | {fmt(r, base, 'time')} | {fmt(r, base, 'mem')} |")
    table = "\n".join(lines)
    print("\n" + table)
    (a.out / f"model_efficiency-{tag}.json").write_text(json.dumps(
        {"device": a.device, "bf16": a.bf16, "max_mem_gib": a.max_mem, "results": results}, indent=2))
    (a.out / f"model_efficiency-{tag}.md").write_text(table + "\n")
    plot(results, a.out / f"model_efficiency-{tag}.png")
    print(f"\nwrote {a.out}/model_efficiency-{tag}.{{json,md,png}}")


if __name__ == "__main__":
    main()
