"""ViS4mer and its S4 layer in pure PyTorch (no Ray, no MLflow here).

    from vis4mer.model import create_model, param_groups
    model = create_model("vis4mer_lvu", num_classes=4)        # (B, 11820, 1024) -> (B, 4)

The names below load on first use (PEP 562): `vis4mer.model.config`, the configs without torch,
can then be imported where configs are only checked, without importing torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "S4Config": "config", "ViS4merConfig": "config",
    "S4": "s4", "kernel_diag": "s4", "kernel_nplr": "s4",
    "ViS4mer": "vis4mer", "VARIANTS": "vis4mer", "create_model": "vis4mer", "list_variants": "vis4mer",
    "variant_config": "vis4mer",
    "SelfAttentionBaseline": "attention",
    "param_groups": "optim",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
