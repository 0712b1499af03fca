"""vis4mer's own code as a wheel, built on the fly, for clusters whose image does not have vis4mer.

    path = build_wheel(folder)          # folder/vis4mer-0.1.0-py3-none-any.whl
    runtime_env = {"py_modules": [str(path)], ...}

The wheel holds the installed `vis4mer.model`, `vis4mer.datasets` and `vis4mer.orchestrator`
(wherever they are imported from: an editable checkout or site-packages) and declares no
dependencies: Ray installs a py_modules wheel with `pip install --target`, which would fetch every
dependency again; torch, Ray and the rest come from the cluster's image. Zip entries carry a fixed
timestamp, so the same code gives the same bytes, and Ray uploads it once (by content hash).
"""
from __future__ import annotations

import base64
import hashlib
import importlib.util
import zipfile
from importlib.metadata import version
from pathlib import Path

PACKAGES = ("vis4mer.model", "vis4mer.datasets", "vis4mer.orchestrator")
_EPOCH = (1980, 1, 1, 0, 0, 0)  # zip's earliest date: a reproducible archive


def _sources() -> dict[str, bytes]:
    """Archive name -> contents of every module of the three packages."""
    out = {}
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{package} is not importable here: install vis4mer first (make install)")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" not in path.parts:
                out[f"{package.replace('.', '/')}/{path.relative_to(root).as_posix()}"] = path.read_bytes()
    return out


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: str | Path) -> Path:
    """Writes vis4mer-<version>-py3-none-any.whl into `folder`; returns its path."""
    ver = version("vis4mer")
    info = f"vis4mer-{ver}.dist-info"
    files = _sources()
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: vis4mer\nVersion: {ver}\n"
                                 "Summary: vis4mer's code for a Ray job; its dependencies come from the "
                                 "cluster's image\n").encode()
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: vis4mer\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    path = Path(folder) / f"vis4mer-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            entry = zipfile.ZipInfo(name, date_time=_EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(entry, data)
    return path
