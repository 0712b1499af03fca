"""The `vis4mer` command (entry point `vis4mer.orchestrator.cli:main`; `python -m vis4mer.orchestrator.cli`)."""
from vis4mer.orchestrator.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
