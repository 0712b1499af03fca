#!/usr/bin/env bash
# The GPU check in one command, on a machine with one GPU: benchmarks/gpu_check.py, at most 8 minutes.
#
#   bash benchmarks/gpu_check.sh                         # every section -> benchmarks/results/gpu_check-gpu.{json,md}
#   bash benchmarks/gpu_check.sh --sections model --out /tmp/gpu
#   OUT=/tmp/gpu PYTHON=/opt/venv/bin/python bash benchmarks/gpu_check.sh
#   bash benchmarks/gpu_check.sh --smoke                 # the same steps on CPU at toy sizes
#
# Needs a Python with PyTorch >= 2.11 (a CUDA build), numpy and pyarrow (timm and torchvision
# used when present); nothing from this repository is installed: gpu_check.py registers a `vis4mer`
# namespace over this checkout's folders (vis4mer.model -> model/, as pyproject.toml's package-dir
# maps them; PYTHONPATH alone cannot rename a folder), and imports neither Ray, MLflow, omegaconf
# nor fsspec.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
PYTHON="${PYTHON:-python3}"
"$PYTHON" - <<'PY'
import sys

import torch

version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if version < (2, 11):
    sys.exit(f"gpu_check needs PyTorch >= 2.11, found {torch.__version__}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU visible'}")
PY
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# the script keeps to its own time budget (--budget-s, 450 s); this only stops a hang.
# --out first: an --out among the arguments comes later and wins.
cd "$root"
exec timeout 600 "$PYTHON" "$here/gpu_check.py" --out "${OUT:-$root/benchmarks/results}" "$@"
