"""Synthetic long-range tasks: deterministic from a seed, no files needed.

`temporal_order`: two event patterns (a and b) are hidden at random, far-apart positions of a noise
sequence; the label is 1 when a comes before b. Mean-pooled features carry no information about
the order (the clip contains both events either way), so they score at chance; a model that
reasons over time can solve it.
"""
from __future__ import annotations

import numpy as np


def temporal_order(n: int, length: int, dim: int, seed: int = 0, noise: float = 1.0,
                   event_len: int = 4, min_gap: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """x (n, length, dim) float32, y (n,) int64 in {0, 1}."""
    if length < 2 * event_len + int(min_gap * length) + 1:
        raise ValueError(f"length={length} is too short for two events of {event_len} steps "
                         f"at least {min_gap:.0%} of the clip apart")
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(12345).standard_normal((2, event_len, dim)).astype(np.float32) * 2.0
    x = rng.standard_normal((n, length, dim)).astype(np.float32) * noise
    y = rng.integers(0, 2, size=n)
    gap = int(min_gap * length)
    for i in range(n):
        first = rng.integers(0, length - 2 * event_len - gap)
        second = rng.integers(first + event_len + gap, length - event_len + 1)
        a, b = (first, second) if y[i] == 1 else (second, first)
        x[i, a : a + event_len] += patterns[0]
        x[i, b : b + event_len] += patterns[1]
    return x, y.astype(np.int64)
