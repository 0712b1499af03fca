"""The `vis4mer` entry point: the model demo learns what mean pooling cannot; user errors exit 2."""
import subprocess

import numpy as np

from tests.support.runs import VIS4MER
from vis4mer.datasets.synthetic import temporal_order


def test_temporal_order_is_deterministic_and_balanced():
    x1, y1 = temporal_order(64, 128, 8, seed=3)
    x2, y2 = temporal_order(64, 128, 8, seed=3)
    assert x1.shape == (64, 128, 8) and x1.dtype == np.float32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert 0.3 < y1.mean() < 0.7
    # the order is invisible to mean pooling: class means of pooled features nearly coincide
    x, y = temporal_order(2000, 128, 8, seed=4)
    pooled = x.mean(1)
    gap = np.abs(pooled[y == 1].mean(0) - pooled[y == 0].mean(0)).max()
    assert gap < 0.03


def test_demo_learns_the_long_range_task():
    out = subprocess.run(VIS4MER + ["demo", "--model-only", "--epochs", "15"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    acc = {line.split("val accuracy")[0].strip(): float(line.split("val accuracy")[1].split("%")[0])
           for line in out.stdout.splitlines() if "val accuracy" in line}
    assert acc["vis4mer (2 stages)"] >= 90.0
    assert acc["mean-pooled (depth 0)"] <= 65.0


def test_models_lists_every_variant():
    from vis4mer.model import list_variants
    out = subprocess.run(VIS4MER + ["models"], capture_output=True, text=True, timeout=120, check=True)
    for name in list_variants():
        assert name in out.stdout


def test_bad_argument_is_one_line_exit_2():
    out = subprocess.run(VIS4MER + ["demo", "--model-only", "--epochs", "zero"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--epochs" in out.stderr and len(out.stderr.strip().splitlines()) == 1
