"""JSON-schema errors as one line naming the path in the document: how the KubeRay CRD checks
(k8s.py) and Ray's ray-schema.json checks (cloud.py) report what they refuse."""
from __future__ import annotations

import re
from typing import Any


def json_path(parts) -> str:
    """['spec', 'workerGroupSpecs', 0, 'replicas'] -> 'spec.workerGroupSpecs[0].replicas'."""
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def schema_error(e, patterns: dict[str, str] | None = None, schema_name: str = "schema") -> str:
    """One line for a jsonschema ValidationError: '<path>: <what was expected>'. `patterns` names
    regular expressions the schema uses (pattern -> 'a Kubernetes quantity ...')."""
    parts = list(e.absolute_path)
    v, instance = e.validator, e.instance
    if v == "required":
        missing = re.match(r"'([^']+)' is a required property", e.message)
        return f"{json_path(parts + [missing.group(1)] if missing else parts)}: required field missing"
    if v == "additionalProperties" and e.validator_value is False and isinstance(instance, dict):
        known = sorted(e.schema.get("properties", {}))
        extra = sorted(k for k in instance if k not in known)
        hint = f"expected one of: {', '.join(known)}" if known and len(known) <= 12 else f"not in the {schema_name}"
        return f"{json_path(parts + extra[:1])}: unknown field ({hint})"
    if v == "type":
        want = e.validator_value if isinstance(e.validator_value, str) else " or ".join(e.validator_value)
        return f"{json_path(parts)}: expected {_a(want)}, got {type(instance).__name__} {_shown(instance)}"
    if v == "enum":
        return f"{json_path(parts)}: {_shown(instance)} is not one of {e.validator_value}"
    if v in ("minimum", "maximum"):
        bound = ">=" if v == "minimum" else "<="
        return f"{json_path(parts)}: expected {bound} {e.validator_value}, got {_shown(instance)}"
    if v == "pattern" and e.validator_value in (patterns or {}):
        return f"{json_path(parts)}: {_shown(instance)} is not {patterns[e.validator_value]}"
    if v == "format" and e.validator_value in ("int32", "int64"):
        fmt = e.validator_value
        return f"{json_path(parts)}: {_shown(instance)}: expected an {fmt} (a {fmt[3:]}-bit integer)"
    if v == "anyOf" and e.schema.get("x-kubernetes-int-or-string"):
        return f"{json_path(parts)}: expected an integer or a string, got {_shown(instance)}"
    return f"{json_path(parts)}: {e.message}"


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
