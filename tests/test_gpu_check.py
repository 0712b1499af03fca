"""benchmarks/gpu_check.sh as a person with a bare GPU machine runs it, here with --smoke (CPU, toy
sizes): vis4mer not installed (the editable install's finder removed at start-up) and Ray, MLflow,
omegaconf and fsspec unimportable; every section runs and writes the JSON a GPU run writes."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("ray", "mlflow", "omegaconf", "fsspec")

# on PYTHONPATH: runs after site-packages' .pth files, so it can take the editable install's finder out
_SITECUSTOMIZE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
"""


def bare_env(tmp_path: Path) -> dict:
    bare = tmp_path / "bare"
    for name in HEAVY:
        (bare / name).mkdir(parents=True)
        (bare / name / "__init__.py").write_text(f"raise ImportError('{name}: not on a bare GPU machine')\n")
    (bare / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return dict(os.environ, PYTHONPATH=str(bare), PYTHON=sys.executable)


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_smoke_runs_bare_and_writes_every_section(tmp_path):
    env = bare_env(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('vis4mer'))"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "None", probe.stdout + probe.stderr  # the install is out of sight
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check-smoke.json").read_text())
    assert (out / "gpu_check-smoke.md").read_text().startswith("# GPU check")

    env_ = result["environment"]
    assert env_["smoke"] is True and env_["heavy_modules_loaded"] == []
    assert env_["vis4mer_import"] == "checkout namespace" and env_["vis4mer_model_from"] == str(ROOT / "model")
    assert list(result["sections"]) == ["model", "fed_step", "encoders"]
    assert all(s["status"] == "ok" for s in result["sections"].values()), result["sections"]

    model = result["sections"]["model"]
    assert set(model) >= {"shape", "precision", "peak", "runs", "largest_batch", "comparison", "elapsed_s"}
    assert set(model["largest_batch"]) == {"vis4mer", "vis4mer-compiled", "attention-sdpa", "attention-naive"}
    for run in model["runs"]:
        assert run["status"] == "ok", run
        for key in ("step_s", "clips_per_s", "peak_memory_bytes", "model_flops_per_step", "mfu"):
            assert finite_positive(run[key]), (key, run)
    assert set(model["comparison"]["measured"]) == {f"{a}_vs_{v}" for a in ("attention-sdpa", "attention-naive")
                                                    for v in ("vis4mer", "vis4mer-compiled")}
    for ratios in model["comparison"]["measured"].values():
        assert finite_positive(ratios["speedup"]) and finite_positive(ratios["memory_ratio"])
    assert model["comparison"]["paper"] == {"speedup_vs_self_attention": 2.63, "memory_ratio_vs_self_attention": 8.0}

    fed = result["sections"]["fed_step"]
    for key in ("clips_per_s", "step_s", "write_s", "bytes_read"):
        assert finite_positive(fed[key]), (key, fed)
    assert 0 <= fed["data_wait_fraction"] < 1
    # real data: every step read `batch` videos from the shards, with the labels the shards hold
    assert fed["steps_run"] == fed["steps"] and fed["clips_seen"] == fed["steps"] * fed["batch"]
    assert fed["videos_read"] == fed["clips_seen"] and fed["wrong_labels"] == 0
    assert fed["distinct_videos"] == fed["dataset"]["videos"]  # 20 steps of 4 over 24 videos: each one seen
    assert fed["bytes_read"] >= fed["clips_seen"] * 64 * 4 * 64 * 2  # at least a window of float16 each

    enc = result["sections"]["encoders"]
    assert [r["extractor"] for r in enc["runs"]] == ["vit", "swin"]
    for r in enc["runs"]:
        assert r["status"] == "ok" and r["dtype"] == "bfloat16" and finite_positive(r["frames_per_s"]), r


def test_gpu_check_rejects_an_unknown_section():
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--sections", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown section" in bad.stderr
