"""The `vis4mer` command run in-process, and the bad-input contract every run must keep."""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from vis4mer.orchestrator.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_main(argv: list[str], cwd: Path) -> CliResult:
    """`vis4mer ARGV` in this process, in `cwd` (fast: no interpreter start, torch already loaded)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse's own errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(old)
    return CliResult(code, out.getvalue(), err.getvalue())


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_contract(r: CliResult, argv: list[str], secret: str | None = None, written: dict | None = None) -> None:
    """Success, or exit code 2 with one line on stderr and no traceback; the secret in no output and
    in no file written."""
    assert r.code in (0, 2), (argv, r.code, r.err[-2000:])
    assert "Traceback" not in r.err, (argv, r.err[-2000:])
    if r.code == 2:
        lines = [ln for ln in r.err.splitlines() if ln.strip()]
        assert len(lines) == 1, (argv, r.err)
    if secret:
        assert secret not in r.out + r.err, (argv, r.out, r.err)
        for name, data in (written or {}).items():
            assert secret.encode() not in data, (argv, name)
