"""`vis4mer extract`: the Transformer encoder stage, videos -> feature shards, as a Ray Data job."""
from __future__ import annotations

import argparse

from vis4mer.orchestrator.cli.args import add_storage_args, positive_float, positive_int, storage_from_args
from vis4mer.orchestrator.files import one_line


def _extract(a) -> int:
    from vis4mer.datasets.encoders import EncoderSpec
    from vis4mer.datasets.extract import ExtractConfig, extract

    spec = EncoderSpec(extractor=a.extractor,
                       preprocess=a.preprocess or ("released" if a.extractor == "vit" else "model"),
                       arch=a.arch)
    cfg = ExtractConfig(videos=a.videos, out=a.out, spec=spec, weights=a.weights, random_init=a.random_init,
                        task=a.task, labels=a.labels, batch_frames=a.batch_frames, dtype=a.dtype,
                        concurrency=a.concurrency,
                        actor_cpus=a.actor_cpus, decode_tasks=a.decode_tasks, part_mb=a.part_mb,
                        overwrite=a.overwrite, storage=storage_from_args(a), progress_s=a.progress_s)
    from vis4mer.orchestrator.train.driver import init_ray

    # extract() checks weights, task, labels, videos and output first; Ray starts only after that
    r = extract(cfg, log=lambda line: print(line, flush=True),
                start_ray=lambda: init_ray(a.address, log_to_driver=False))
    print(r.summary(a.out))
    print(f"wrote {one_line(a.out)}: {len(r.manifest.shards)} shards, {r.manifest.split_rows()}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("extract", help="encode videos with a frozen ViT-L/16 or Video Swin-B into feature shards "
                                       "(Ray Data job; resumable)")
    e.add_argument("--videos", required=True,
                   help="folder or object-store prefix of video files (searched recursively)")
    e.add_argument("--out", required=True, help="output folder or prefix (a rerun resumes it)")
    e.add_argument("--extractor", required=True, choices=["vit", "swin"],
                   help="vit: 1 frame/s -> 197 x 1024 (LVU); swin: 32-frame segments -> 49 x 1024 (Breakfast, COIN)")
    e.add_argument("--weights", help="state-dict file (.pth/.safetensors, local path or URI); never downloaded")
    e.add_argument("--preprocess", choices=["released", "model"],
                   help="released: /255 only, as the authors' LVU features (vit default); model: the encoder's "
                        "mean/std (swin default and only choice)")
    e.add_argument("--task", help="task of the rows (default lvu_genre for vit, breakfast for swin)")
    e.add_argument("--labels", help="CSV with header video_id,label[,split]; default: label 0, split train")
    e.add_argument("--batch-frames", type=positive_int, default=16,
                   help="frames per encoder forward (swin: whole 32-frame segments); on a GPU use more: "
                        "benchmarks/extract.py --device cuda --batches auto reports the largest that fits")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="encoder compute: float32 (default), or float16/bfloat16 under torch.autocast for GPU "
                        "tensor-core speed (features differ by ~1e-3 relative; the manifest records it)")
    e.add_argument("--concurrency", type=positive_int, help="encoder actors (default: the cluster's GPUs, else 1)")
    e.add_argument("--actor-cpus", type=positive_float, default=1.0, help="CPUs (torch threads) per actor without GPU")
    e.add_argument("--decode-tasks", type=positive_int, default=2, help="concurrent decode tasks")
    e.add_argument("--part-mb", type=positive_float, default=256.0, help="resume granularity: MB of features per part")
    e.add_argument("--progress-s", type=positive_float, default=5.0, help="seconds between progress lines")
    e.add_argument("--overwrite", action="store_true", help="drop what --out holds and start over")
    e.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    e.add_argument("--arch", default="large", choices=["large", "tiny"], help=argparse.SUPPRESS)  # tiny: tests
    e.add_argument("--random-init", action="store_true", help=argparse.SUPPRESS)  # tests, benchmarks
    add_storage_args(e)
    e.set_defaults(func=_extract)
