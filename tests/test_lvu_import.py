"""The LVU importer on the real LVU 1.0 label files, with small generated .npy feature files."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.support.runs import VIS4MER
from vis4mer.datasets.format import DatasetError, open_dataset, verify, video_features
from vis4mer.datasets.lvu import import_lvu, parse_labels
from vis4mer.datasets.tasks import LVU_TASKS, TASKS, get_task

LABELS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "lvu_1.0"
pytestmark = pytest.mark.skipif(not LABELS.is_dir(), reason="../shared/benchmarks is not beside the project")

# spec section 5: classes and train/val/test videos per task
SPEC = {
    "relationship": (4, (149, 53, 42)), "way_speaking": (5, (939, 205, 201)), "scene": (6, (557, 120, 86)),
    "like_ratio": (1, (658, 142, 140)), "view_count": (1, (577, 124, 126)), "director": (10, (680, 163, 107)),
    "genre": (4, (3063, 597, 647)), "writer": (10, (769, 174, 168)), "year": (9, (770, 165, 143)),
}


@pytest.mark.parametrize("task", LVU_TASKS)
def test_label_files_parse_as_the_spec_says(task):
    spec = get_task(f"lvu_{task}")
    classes, counts = SPEC[task]
    assert spec.num_classes == classes and spec.seq_len == 11820
    for split, n in zip(("train", "val", "test"), counts):
        rows = parse_labels((LABELS / task / f"{split}.csv").read_text(), task)
        assert len(rows) == n
        if spec.type == "classification":
            assert all(0 <= r.label < classes for r in rows)
        else:
            assert all(math.isfinite(r.label) for r in rows)


def test_registry_covers_the_benchmarks():
    assert {f"lvu_{t}" for t in SPEC} | {"breakfast", "coin"} <= set(TASKS)
    assert get_task("breakfast").seq_len == get_task("coin").seq_len == 64 * 49
    assert get_task("coin").num_classes == 180 and get_task("breakfast").num_classes == 10


@pytest.mark.parametrize("task", ["relationship", "like_ratio"])
def test_import_with_generated_features(tmp_path, task):
    feats = tmp_path / "features"
    feats.mkdir()
    rng = np.random.default_rng(0)
    chosen = {}
    for split in ("train", "val", "test"):
        lines = (LABELS / task / f"{split}.csv").read_text().splitlines()[1:]
        for line in lines[:3]:  # features for 3 videos per split; the rest are missing
            yid = line.split()[-2]
            x = rng.standard_normal((int(rng.integers(2, 5)), 197, 1024)).astype(np.float32)
            np.save(feats / f"{yid}.npy", x)
            chosen[yid] = (split, x, line.split())
    manifest, report = import_lvu(task, str(LABELS), str(feats), str(tmp_path / "out"))
    classes, counts = SPEC[task]
    assert report.written == {"train": 3, "val": 3, "test": 3}
    assert {s: len(v) for s, v in report.missing.items()} == {
        s: n - 3 for s, n in zip(("train", "val", "test"), counts)}
    assert f"train: 3 written, {counts[0] - 3} without features" in report.summary()
    verify(str(tmp_path / "out"))
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.manifest.extractor["preprocessing"].startswith("released")
    import pyarrow.parquet as pq
    for shard in ds.manifest.shards:
        t = pq.read_table(tmp_path / "out" / shard["path"])
        for vid, label, x in zip(t.column("video_id").to_pylist(), t.column("label").to_pylist(),
                                 video_features(t.column("features"), 197, 1024)):
            split, orig, fields = chosen[vid]
            assert shard["split"] == split
            np.testing.assert_array_equal(x, orig.astype(np.float16))
            if task == "like_ratio":  # the released code's transform, computed here from the raw counts
                like, dislike = float(fields[0]), float(fields[1])
                assert label == pytest.approx(10 * like / (like + dislike) - 9.138220535629456)
            else:
                assert label == int(fields[0])


def test_import_errors(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    with pytest.raises(DatasetError, match="no videos were added"):
        import_lvu("scene", str(LABELS), str(feats), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    yid = (LABELS / "scene" / "train.csv").read_text().splitlines()[1].split()[-2]
    np.save(feats / f"{yid}.npy", np.zeros((3, 196, 1024), np.float32))
    with pytest.raises(DatasetError, match=rf"{yid}.npy: shape \(3, 196, 1024\): expected \(frames, 197, 1024\)"):
        import_lvu("scene", str(LABELS), str(feats), str(tmp_path / "out"))
    out = subprocess.run([*VIS4MER, "data", "import-lvu", "--task", "plot",
                          "--labels", str(LABELS), "--features", str(feats), "--out", str(tmp_path / "o2")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "LVU task 'plot'" in out.stderr
