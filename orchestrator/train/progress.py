"""One progress line per epoch, printed by Ray Train's controller (a UserCallback)."""
from __future__ import annotations

import ray.train

KEYS = ("train_loss", "train_acc", "val_loss", "val_top1", "val_mse", "lr", "clips_per_s", "data_wait_frac")


def format_epoch(m: dict, epochs: int | None = None) -> str:
    head = f"epoch {int(m.get('epoch', 0)) + 1}" + (f"/{epochs}" if epochs else "")
    parts = [f"{k} {m[k]:.4g}" for k in KEYS if isinstance(m.get(k), (int, float))]
    return "  ".join([head, *parts])


class EpochProgress(ray.train.UserCallback):
    def __init__(self, epochs: int | None = None, prefix: str = ""):
        self.epochs, self.prefix = epochs, prefix

    def after_report(self, run_context, metrics, checkpoint):
        if metrics:
            print(f"{self.prefix}{format_epoch(metrics[0], self.epochs)}" + ("  [checkpoint]" if checkpoint else ""),
                  flush=True)
