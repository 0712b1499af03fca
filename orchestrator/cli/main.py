"""The `vis4mer` command line: one parser, a module per group of commands (cli/*.py).

A user's mistake (vis4mer.datasets.errors.UserError: a bad option, value, file or URI) prints one
line naming the culprit and exits with code 2, without a traceback; the line passes through
`redact` (no URI credentials, no secret environment value) and `one_line` (a line break in a
file name or value the user gave is shown escaped). Anything else is a bug inside
vis4mer: its traceback is shown and the exit code is 1.
"""
from __future__ import annotations

import sys

from vis4mer.datasets.errors import UserError
from vis4mer.orchestrator.cli import cloud, data, extract, jobs, k8s, registry, sweep, train
from vis4mer.orchestrator.cli.args import Parser
from vis4mer.orchestrator.files import one_line
from vis4mer.orchestrator.secret_names import redact


def build_parser() -> Parser:
    p = Parser(prog="vis4mer", description="ViS4mer long-video models on Ray: train, sweep, track.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in (sweep, registry, train, data, extract, jobs, k8s, cloud):
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"vis4mer {args.command}: error: {one_line(redact(str(e)))}", file=sys.stderr)
        return 2


