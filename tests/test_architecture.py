"""The package's shape, read from the code: one `vis4mer` namespace, imports one way down
(docs/architecture.md), and a stand-in top-level `datasets` package that vis4mer leaves alone."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.support.runs import ROOT

PACKAGES = {"model": "vis4mer.model", "datasets": "vis4mer.datasets", "orchestrator": "vis4mer.orchestrator"}
# orchestrator's layers, bottom up: a module imports from its own layer and the ones below
LAYERS = ["orchestrator", "train", "sweep", "deploy", "cli"]
THIRD_PARTY_BANNED = {"vis4mer.model": {"ray", "mlflow", "omegaconf"}}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["vis4mer", *parts])


def _imports(path: Path) -> list[str]:
    """Every module a file imports, relative imports resolved, at any depth (lazy imports count)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
    return out


def _sources(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py")) if "__pycache__" not in p.parts]


def _layer(module: str) -> int:
    parts = module.split(".")  # vis4mer.orchestrator[.layer[.module]]
    return LAYERS.index(parts[2]) if len(parts) > 2 and parts[2] in LAYERS[1:] else 0


@pytest.mark.parametrize("path", _sources("model", "datasets", "orchestrator"), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path):
    me = _module_name(path)
    mine = next(pkg for pkg in PACKAGES.values() if me == pkg or me.startswith(pkg + "."))
    for imported in _imports(path):
        top = imported.split(".")[0]
        assert top not in PACKAGES, f"{me} imports {imported!r}: use vis4mer.{imported}"
        assert top not in THIRD_PARTY_BANNED.get(mine, ()), f"{me} imports {imported} ({mine} must not)"
        if not imported.startswith("vis4mer."):
            continue
        if mine == "vis4mer.model":
            assert imported.startswith("vis4mer.model"), f"{me} imports {imported}: model imports no other layer"
        if mine in ("vis4mer.model", "vis4mer.datasets"):
            assert not imported.startswith("vis4mer.orchestrator"), f"{me} imports {imported}"
        if mine == "vis4mer.orchestrator" and imported.startswith("vis4mer.orchestrator"):
            assert _layer(imported) <= _layer(me), (
                f"{me} ({LAYERS[_layer(me)]}) imports {imported} ({LAYERS[_layer(imported)]}): "
                f"layers go {' < '.join(LAYERS)}")


def test_the_layer_rule_catches_an_upward_import():
    """The checker itself: a train module importing sweep is upward, cli importing train is not."""
    assert _layer("vis4mer.orchestrator.train.config") < _layer("vis4mer.orchestrator.sweep.spec")
    assert _layer("vis4mer.orchestrator.files") == 0
    assert _layer("vis4mer.orchestrator.cli.main") == LAYERS.index("cli")
    assert _imports(ROOT / "orchestrator" / "cli" / "__init__.py") == [
        "vis4mer.orchestrator.cli.main", "vis4mer.orchestrator.cli.main.build_parser",
        "vis4mer.orchestrator.cli.main.main"]


def _old_dotted_names(text: str) -> list[str]:
    """Dotted names in prose that name one of our modules by its old top-level name, e.g.
    `model.s4_kernels.chunked_contraction` (a config key such as `model.d_state` names no module)."""
    import re

    found = []
    for m in re.finditer(r"(?<![\w./-])(model|datasets|orchestrator)\.([a-z_][a-z0-9_]*)", text):
        folder, name = m.groups()
        if (ROOT / folder / f"{name}.py").exists() or (ROOT / folder / name / "__init__.py").exists():
            found.append(m.group(0))
    return found


def test_tests_benchmarks_and_docs_use_the_vis4mer_names():
    for path in _sources("tests", "benchmarks"):
        for imported in _imports(path):
            assert imported.split(".")[0] not in PACKAGES, f"{path.relative_to(ROOT)} imports {imported}"
    for path in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "Dockerfile", *(ROOT / "docs").glob("*.md"),
                 *(ROOT / "deploy").rglob("*.yaml"), *(ROOT / "sweeps").glob("*.yaml")]:
        assert not _old_dotted_names(path.read_text()), (path.name, _old_dotted_names(path.read_text()))
    assert _old_dotted_names("from `model.s4_kernels` import x; set `model.d_state`") == ["model.s4_kernels"]


def test_every_package_folder_is_installed():
    """setuptools does not apply a package-dir mapping to discovered packages: the list in
    pyproject.toml must name every folder that is a package."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert cfg["package-dir"] == {v: k for k, v in PACKAGES.items()}
    found = {_module_name(p) for folder in PACKAGES for p in (ROOT / folder).rglob("__init__.py")}
    assert listed == found


def _run(code: str, cwd: Path, path: list[Path] | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path or [])))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_only_the_vis4mer_names_import(tmp_path):
    out = _run("import vis4mer.model, vis4mer.datasets.format, vis4mer.orchestrator.cli; print('ok')", tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    for name in ("model", "orchestrator", "datasets"):
        out = _run(f"import {name}", tmp_path)
        assert out.returncode != 0 and f"No module named '{name}'" in out.stderr, (name, out.stderr)


def test_a_stand_in_datasets_package_first_on_the_path_is_left_alone(tmp_path):
    """As in an environment with Hugging Face's `datasets`: `import datasets` returns it, and the
    model, a dataset round trip and the CLI still work."""
    stand_in = tmp_path / "site"
    (stand_in / "datasets").mkdir(parents=True)
    (stand_in / "datasets" / "__init__.py").write_text("STAND_IN = 'hugging face'\n")
    code = """
import datasets
assert datasets.STAND_IN == 'hugging face', datasets.__file__
import torch
from vis4mer.model import create_model
assert create_model('vis4mer_tiny')(torch.randn(1, 256, 64)).shape == (1, 2)
from vis4mer.datasets.synthetic import write_synthetic
from vis4mer.datasets.format import verify
write_synthetic('ds', videos=(4, 2, 2), frames=8, min_frames=8, tokens=2, dim=4)
assert verify('ds')['videos'] == 8
import sys
from vis4mer.orchestrator.cli import main
assert main(['data', 'inspect', 'ds']) == 0
assert sys.modules['datasets'].STAND_IN == 'hugging face'
print('stand-in kept')
"""
    out = _run(code, tmp_path, [stand_in])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("stand-in kept")
