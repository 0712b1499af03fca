"""What every `vis4mer` command module shares: the parser class, argument types, storage options."""
from __future__ import annotations

import argparse
import math

from vis4mer.datasets.storage import StorageOptions
from vis4mer.datasets.tasks import INT32_MAX
from vis4mer.orchestrator.files import one_line
from vis4mer.orchestrator.secret_names import redact


class Parser(argparse.ArgumentParser):
    """argparse's own errors as one line and exit code 2 (usage is in --help), secrets redacted."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(redact(message))}\n")




def int_between(minimum: int, maximum: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return value

    return parse


positive_int = int_between(1, INT32_MAX, f"a positive integer (at most {INT32_MAX})")
non_negative_int = int_between(0, INT32_MAX, f"a non-negative integer (at most {INT32_MAX})")
seed_int = int_between(0, 2**32 - 1, "a seed from 0 to 2**32 - 1")  # numpy's range


def _finite_float(ok, what: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value

    return parse


positive_float = _finite_float(lambda v: v > 0, "a positive number")
non_negative_float = _finite_float(lambda v: v >= 0, "a finite number >= 0")


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("storage (credentials come from the environment or --profile, never flags)")
    g.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    g.add_argument("--region")
    g.add_argument("--profile", help="named credentials profile")
    g.add_argument("--path-style", action="store_true", help="path-style S3 addressing")


def storage_from_args(a) -> StorageOptions:
    return StorageOptions(endpoint_url=a.endpoint_url, region=a.region, profile=a.profile, path_style=a.path_style)
