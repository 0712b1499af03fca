"""Importer for the released LVU features and the LVU 1.0 label files.

Features: one `<youtube_id>.npy` per video, (frames, 197, 1024), one frame per second, under any
URI the filesystem factory serves. Labels: `lvu_1.0/<task>/{train,val,test}.csv`, space separated
with a header (../shared/benchmarks/README.md):
    classification   class_id class_name... youtube_id imdb_id   (class names may contain spaces)
    view_count       view_count youtube_id imdb_id               -> log(views) - 11.764...
    like_ratio       like_count dislike_count youtube_id imdb_id -> 10 like / (like + dislike) - 9.138...
Videos whose features are missing are counted and reported per split, never silently dropped.
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import numpy as np

from vis4mer.datasets.errors import UserError
from vis4mer.datasets.format import DatasetError, DatasetWriter, Manifest, as_float16
from vis4mer.datasets.storage import StorageOptions, filesystems, read_text
from vis4mer.datasets.tasks import LIKE_RATIO_SHIFT, LVU_TASKS, VIEW_COUNT_SHIFT, get_task

YOUTUBE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class LabelRow:
    youtube_id: str
    label: float | int


def parse_labels(text: str, task: str, where: str = "labels") -> list[LabelRow]:
    if task not in LVU_TASKS:
        raise UserError(f"LVU task {task!r}: expected one of {', '.join(LVU_TASKS)}")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DatasetError(f"{where}: empty label file")
    rows = []
    for n, line in enumerate(lines[1:], start=2):  # the first line is a header
        f = line.split()
        try:
            if task == "view_count":
                rows.append(LabelRow(f[1], math.log(float(f[0])) - VIEW_COUNT_SHIFT))
            elif task == "like_ratio":
                like, dislike = float(f[0]), float(f[1])
                rows.append(LabelRow(f[2], 10 * like / (like + dislike) - LIKE_RATIO_SHIFT))
            else:
                if len(f) < 4:
                    raise ValueError("too few fields")
                rows.append(LabelRow(f[-2], int(f[0])))
        except (ValueError, IndexError, ZeroDivisionError) as e:
            raise DatasetError(f"{where}:{n}: cannot parse {line!r:.120} as a {task} label ({e})") from None
        if not YOUTUBE_ID.fullmatch(rows[-1].youtube_id):  # it names a file under --features: never a path
            raise DatasetError(f"{where}:{n}: video id {rows[-1].youtube_id!r:.80}: expected a YouTube id "
                               "(letters, digits, '_' and '-')")
    return rows


@dataclass
class ImportReport:
    task: str
    written: dict[str, int] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{s}: {self.written.get(s, 0)} written, {len(self.missing.get(s, []))} without features"
                 for s in ("train", "val", "test")]
        return f"lvu_{self.task}: " + "; ".join(parts)


def import_lvu(task: str, labels_dir: str, features_uri: str, out_uri: str,
               storage: StorageOptions | None = None, shard_bytes: int = 512 * 2**20,
               overwrite: bool = False) -> tuple[Manifest, ImportReport]:
    if task not in LVU_TASKS:
        raise UserError(f"LVU task {task!r}: expected one of {', '.join(LVU_TASKS)}")
    spec = get_task(f"lvu_{task}")
    labels = filesystems(labels_dir, storage)
    feats = filesystems(features_uri, storage)
    report = ImportReport(task)
    extractor = {"name": "vit_large_patch16_224_in21k", "source": "LVU released features",
                 "frames_per_second": 1, "tokens_per_frame": 197, "feature_dim": 1024,
                 "preprocessing": "released: RGB 224x224 (area), divided by 255, no mean/std normalisation"}
    with DatasetWriter(out_uri, spec, extractor, storage=storage, shard_bytes=shard_bytes, overwrite=overwrite) as w:
        for split in ("train", "val", "test"):
            path = labels.join(task, f"{split}.csv")
            where = labels.uri(task, f"{split}.csv")
            text = read_text(path, "label file", fs=labels.fs, where=where, error=DatasetError)
            rows = parse_labels(text, task, where=where)
            for row in rows:
                npy = feats.join(f"{row.youtube_id}.npy")
                try:
                    with feats.fs.open(npy, "rb") as f:
                        x = np.load(io.BytesIO(f.read()), allow_pickle=False)
                except FileNotFoundError:
                    report.missing.setdefault(split, []).append(row.youtube_id)
                    continue
                except (ValueError, EOFError, OSError) as e:  # empty, truncated, not an array, a folder
                    raise DatasetError(f"{feats.uri(f'{row.youtube_id}.npy')}: not a readable .npy "
                                       f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'empty'})"
                                       ) from None
                where = feats.uri(f"{row.youtube_id}.npy")
                if x.ndim != 3 or x.shape[1:] != (197, 1024):
                    raise DatasetError(f"{where}: shape {x.shape}: expected (frames, 197, 1024)")
                w.add(row.youtube_id, as_float16(x, where), row.label, split)
                report.written[split] = report.written.get(split, 0) + 1
    return w.manifest, report
