"""Ray Train overhead: the same model and data, one Ray Train worker against a plain PyTorch loop.

    ../shared/tools/loopback .venv/bin/python benchmarks/train_overhead.py [--videos 128 --epochs 3]

Writes a synthetic dataset (frames x tokens x dim per video, float16 shards), then in one run:
  * plain:     shards read with pyarrow into memory once; each epoch cuts the same training windows
               (datasets.windows, seeded by (seed, epoch, video)) and runs forward/backward/AdamW;
  * ray-train: `run_training` with one worker: Ray Data streaming the shards every epoch,
               TorchTrainer, the project's training loop (evaluation off, no tracking).
Reports the steady-state epoch time (median over epochs after the first), the whole run's wall
time, and the ratios ray-train / plain. JSON and a PNG in benchmarks/results/.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_run(uri: str, cfg, epochs: int) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from vis4mer.datasets.format import open_dataset, video_features
    from vis4mer.datasets.windows import example_rng, train_example
    from vis4mer.model import ViS4mer, param_groups
    from vis4mer.orchestrator.train.config import model_config
    from vis4mer.orchestrator.train.worker import loss_fn

    t_start = time.perf_counter()
    ds = open_dataset(uri)
    task = ds.task
    videos = []
    for s in ds.shards("train"):
        t = pq.read_table(os.path.join(uri, s["path"]), columns=["video_id", "label", "features"])
        feats = video_features(t.column("features"), task.tokens_per_frame, task.feature_dim)
        videos += list(zip(t.column("video_id").to_pylist(), feats, t.column("label").to_pylist()))
    torch.manual_seed(cfg.train.seed)
    model = ViS4mer(model_config(cfg.model, task)).train()
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.ssm_lr))
    B = cfg.data.batch_size
    times = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(videos))
        for i in range(0, len(order) - B + 1, B):
            idx = order[i : i + B]
            windows = [train_example(videos[j][1], task, example_rng(cfg.train.seed, epoch, videos[j][0])) for j in idx]
            x = torch.from_numpy(np.stack(windows)).float()
            y = torch.tensor([videos[j][2] for j in idx])
            loss = loss_fn(model(x), y, task)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return {"epoch_times_s": times, "wall_s": time.perf_counter() - t_start}


def ray_run(cfg) -> dict:
    from vis4mer.orchestrator.train.driver import init_ray, run_training

    t0 = time.perf_counter()
    init_ray()
    out = run_training(cfg)
    wall = time.perf_counter() - t0
    # a checkpoint each epoch
    per_epoch = sorted((m["epoch"], m["epoch_time_s"]) for _, m in out.result.best_checkpoints)
    return {"epoch_times_s": [t for _, t in per_epoch], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=512)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cpus", type=float, default=2, help="CPUs (threads) of the Ray Train worker and of the plain loop")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                   help="data.cache: materialise the (small) dataset in the object store once")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = p.parse_args()
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")

    from vis4mer.datasets.synthetic import write_synthetic
    from vis4mer.orchestrator.train.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"{tmp}/data"
        write_synthetic(uri, videos=(a.videos, 8, 8), frames=a.frames, min_frames=a.frames, tokens=a.tokens, dim=a.dim)
        cfg = load_config(None, [
            f"data.uri={uri}", f"run.storage_path={tmp}/runs", "run.name=overhead", f"model.d_model={a.d_model}",
            "model.n_layers=3", "model.d_state=64", "model.dropout=0.0", "data.batch_size=16",
            f"train.epochs={a.epochs}", "train.eval_every=1000", "train.checkpoint_every=1",
            f"train.keep_last={a.epochs}", "schedule.kind=constant", "tracking.enabled=false", "data.eval_splits=[val]",
            "data.shuffle_files=false", f"scaling.cpus_per_worker={a.cpus}",
            f"data.cache={'memory' if a.cache else 'none'}"])
        import torch
        torch.set_num_threads(int(a.cpus))  # the plain loop gets the threads the Ray worker gets
        plain = plain_run(uri, cfg, a.epochs)
        print(f"plain      epochs {[round(t, 2) for t in plain['epoch_times_s']]} s, wall {plain['wall_s']:.1f} s",
              flush=True)
        rayr = ray_run(cfg)
        print(f"ray-train  epochs {[round(t, 2) for t in rayr['epoch_times_s']]} s, wall {rayr['wall_s']:.1f} s",
              flush=True)
    steady = lambda r: statistics.median(r["epoch_times_s"][1:] or r["epoch_times_s"])  # noqa: E731
    result = {"config": vars(a) | {"out": str(a.out)}, "plain": plain, "ray_train": rayr,
              "epoch_ratio": steady(rayr) / steady(plain), "wall_ratio": rayr["wall_s"] / plain["wall_s"]}
    print(f"\nsteady-state epoch: ray-train {steady(rayr):.2f} s vs plain {steady(plain):.2f} s "
          f"-> {result['epoch_ratio']:.2f}x")
    print(f"whole run (incl. start-up, {a.epochs} epochs): {rayr['wall_s']:.1f} s vs {plain['wall_s']:.1f} s "
          f"-> {result['wall_ratio']:.2f}x")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "train_overhead.json").write_text(json.dumps(result, indent=2, default=str))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, r in (("plain", plain), ("ray-train", rayr)):
        ax.plot(range(1, len(r["epoch_times_s"]) + 1), r["epoch_times_s"], "o-", label=name)
    ax.set(xlabel="epoch", ylabel="epoch time (s)",
           title=f"Ray Train overhead: {result['epoch_ratio']:.2f}x steady state")
    ax.legend()
    fig.tight_layout()
    fig.savefig(a.out / "train_overhead.png", dpi=120)
    print(f"wrote {a.out}/train_overhead.{{json,png}}")


if __name__ == "__main__":
    main()
