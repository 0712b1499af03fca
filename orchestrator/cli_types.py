"""Shared pieces of the CLI modules: argument types and the dotted path of a manifest field."""
from __future__ import annotations

import argparse


def _int_at_least(minimum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is {what}")
        return value

    return parse


positive_int = _int_at_least(1, "not a positive integer")
non_negative_int = _int_at_least(0, "negative")


def json_path(parts) -> str:
    """['spec', 'workerGroupSpecs', 0, 'replicas'] -> 'spec.workerGroupSpecs[0].replicas'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"
