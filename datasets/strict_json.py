"""JSON as vis4mer reads the files users give it (dataset manifests, safetensors headers).

`json.loads` keeps the last of a key given twice in one object, silently: a manifest edited by hand
with two `task` sections would be read as the second, and the error (if any) would be about
something else. Here a duplicate key is refused, naming it. Imports only the standard library
(encoders.py, which benchmarks import alone, uses it too).
"""
from __future__ import annotations

import json


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def parse_json(text: str | bytes, where: str, error: type[Exception]) -> object:
    """JSON as every reader of vis4mer's files reads it (manifests, safetensors headers): a key given
    twice in one object is refused (json keeps the last one silently), and so is text nested too
    deeply; one `error` naming `where` (and the key)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.args[0]!r:.80} appears twice in one object: expected each key once") from None
    except RecursionError:
        raise error(f"{where}: not valid JSON for this file (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{where}: not valid JSON ({str(e).splitlines()[0][:200]})") from None
