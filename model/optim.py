"""AdamW parameter groups from the optimiser hints that SSM parameters carry (`p._optim`)."""
from __future__ import annotations

import torch.nn as nn


def param_groups(model: nn.Module, lr: float, weight_decay: float, ssm_lr: float | None = None) -> list[dict]:
    """One group of regular parameters (global lr and weight decay), one group per distinct hint.

    As in the released recipe: SSM parameters (Lambda, B/P, log_dt; A and B for S4D) get lr 1e-3
    and no weight decay; everything else, C~/Q and D included, uses the global settings.
    """
    regular, hinted = [], {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", None)
        if hint is None:
            regular.append(p)
        else:
            hinted.setdefault(tuple(sorted(hint.items())), []).append(p)
    groups = [{"params": regular, "lr": lr, "weight_decay": weight_decay}]
    for key, params in hinted.items():
        hint = dict(key)
        if ssm_lr is not None and "lr" in hint:
            hint["lr"] = ssm_lr
        groups.append({"params": params, "lr": lr, "weight_decay": weight_decay, **hint})
    return groups
