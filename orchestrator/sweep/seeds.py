"""Seeds as a sweep dimension: trials that differ only in `train.seed` are one configuration.

    groups = group_by_config(rows, lambda r: r.params, lambda r: r.value)
    # [ConfigGroup(params={...without train.seed}, values=[..], members=[..]), ...]

`vis4mer best` ranks configurations by their mean over seeds (mean +- std, count); `vis4mer
report` draws the spread. A search space that has `train.seed` groups by default.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field

SEED_KEY = "train.seed"


def searches_seeds(params: list[dict]) -> bool:
    """Whether the trials' sampled parameters include the seed (it is in the search space)."""
    return any(SEED_KEY in p for p in params)


def without_seed(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != SEED_KEY}


@dataclass
class ConfigGroup:
    params: dict  # the configuration, seed left out
    values: list[float] = field(default_factory=list)  # the metric of each seed's trial
    members: list = field(default_factory=list)  # the trials themselves, in the order of `values`

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for a single seed)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def group_by_config(items: list, params_of, value_of) -> list[ConfigGroup]:
    """Items grouped by their parameters without the seed, in order of first appearance."""
    groups: dict[str, ConfigGroup] = {}
    for item in items:
        params = without_seed(params_of(item))
        g = groups.setdefault(json.dumps(params, sort_keys=True, default=str), ConfigGroup(params))
        g.values.append(float(value_of(item)))
        g.members.append(item)
    return list(groups.values())
