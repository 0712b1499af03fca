"""Sweep specs: a base training config, a search space, a scheduler and a budget (no Ray here).

A sweep YAML (sweeps/*.yaml, the launch command in its first line):

    name: demo
    base: train_synthetic.yaml            # a training config, relative to this file
    overrides: {train.epochs: 8}          # applied to the base for every trial
    search_space:
      model.d_state: {grid: [16, 32]}     # grid | choice | uniform | loguniform | randint
      optim.lr: {loguniform: [1.0e-3, 1.0e-2]}
      model:                              # a choice of dicts sets several keys together
        choice: [{n_layers: 0}, {n_layers: 2, pool: [2, 2]}]
    scheduler: {kind: asha, grace_period: 2, reduction_factor: 2}   # or {kind: fifo}
    metric: val_top1                       # default: the dataset task's (val_top1 / val_mse)
    budget: {num_samples: 1, max_concurrent_trials: null, max_failures: 0}

`load_sweep` reads and checks it: every discrete combination of the search space must make a valid
training config before any Ray work. `vis4mer.orchestrator.sweep.tune_run` runs it on Ray Tune.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vis4mer.datasets.tasks import INT32_MAX
from vis4mer.orchestrator.files import load_yaml, parse_yaml
from vis4mer.orchestrator.train.config import ConfigError, check_name, load_config

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SPEC_KEYS = ("name", "base", "overrides", "search_space", "scheduler", "metric", "budget")
# max_failures: how often Tune restarts a trial whose driver died (a lost node); the restarted trial
# resumes its Train run from the last checkpoint under its stable name
# Limits on what a sweep may spend (hours of its trials' measured run time, times the CPUs or GPUs
# one run holds: train.config.run_resources), and prices per hour for the estimated cost. Enforced
# by Tune stoppers (sweep/budget.py); a sweep that reaches one ends cleanly and says so.
SPEND_KEYS = ("max_trial_hours", "max_sweep_cpu_hours", "max_sweep_gpu_hours", "price_per_cpu_hour",
              "price_per_gpu_hour")
BUDGET_KEYS = {"num_samples", "max_concurrent_trials", "max_failures", *SPEND_KEYS}


@dataclass
class SweepSpec:
    name: str
    base: str  # absolute path of the base training config
    overrides: dict[str, Any] = field(default_factory=dict)
    search_space: dict[str, dict] = field(default_factory=dict)
    scheduler: dict = field(default_factory=lambda: {"kind": "asha"})
    metric: str | None = None
    budget: dict = field(default_factory=lambda: {"num_samples": 1, "max_concurrent_trials": None})
    path: str | None = None

    def base_overrides(self, extra: list[str] | None = None) -> list[str]:
        return [f"{k}={_dot_value(v)}" for k, v in self.overrides.items()] + list(extra or [])


def trial_name(sweep: str, trial_id: str) -> str:
    """A trial's stable name: its Train run, checkpoints and MLflow child run are found by it again
    when an interrupted sweep resumes."""
    return f"{sweep}-{trial_id}"


def _dot_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def expand(key: str, value: Any) -> list[str]:
    """One sampled value -> dotlist overrides (a dict value sets several keys under `key`)."""
    if isinstance(value, dict):
        return [f"{key}.{k}={_dot_value(v)}" for k, v in value.items()]
    return [f"{key}={_dot_value(value)}"]


def trial_overrides(params: dict) -> list[str]:
    """A trial's sampled parameters as dotlist overrides of the base config."""
    return [o for key, value in params.items() for o in expand(key, value)]


def load_sweep(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """Reads and validates a sweep YAML; `overrides` (key=value) apply to the base training config.
    An override of a searched key fixes it: `model.d_state=16` takes d_state out of the search space."""
    p = Path(path)
    raw = load_yaml(p, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with name, base, search_space, scheduler, budget")
    unknown = set(raw) - set(SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown, key=str)[0]!r}")
    for k in ("name", "base", "search_space"):
        if k not in raw:
            raise ConfigError(f"{path}: {k}: required")
    for k, kind in (("name", str), ("base", str), ("overrides", dict), ("search_space", dict), ("scheduler", dict),
                    ("metric", str), ("budget", dict)):
        if raw.get(k) is not None and not isinstance(raw[k], kind):
            raise ConfigError(f"{path}: {k}: expected {'a string' if kind is str else 'a mapping'}, "
                              f"got {type(raw[k]).__name__}")
    spec = SweepSpec(name=raw["name"], base=str((p.parent / raw["base"]).resolve()),
                     overrides=dict(raw.get("overrides") or {}), search_space=dict(raw["search_space"] or {}),
                     scheduler=dict(raw.get("scheduler") or {"kind": "asha"}), metric=raw.get("metric"),
                     budget={"num_samples": 1, "max_concurrent_trials": None, **(raw.get("budget") or {})}, path=str(p))
    pinned = []
    for o in overrides or []:
        if "=" not in o:
            raise ConfigError(f"override {o!r}: expected key=value")
        k, v = o.split("=", 1)
        spec.overrides[k] = parse_yaml(v, f"override {k}")
        if spec.search_space.pop(k, None) is not None:  # given on the command line: fixed, not searched
            pinned.append(k)
    if pinned and not spec.search_space:
        raise ConfigError(f"{path}: overrides {', '.join(pinned)} fix every searched key: nothing left to sweep "
                          "(use vis4mer train for a single run)")
    validate_sweep(spec)
    return spec


def _need_int(section: dict, key: str, low: int, where: str, nullable: bool = False) -> None:
    """section[key], where given, is an integer from `low` to 2**31 - 1 (a bool is not one), or null
    where `nullable`."""
    v = section.get(key)
    if key not in section or (v is None and nullable):
        return
    if not (isinstance(v, int) and not isinstance(v, bool) and low <= v <= INT32_MAX):
        raise ConfigError(f"{where}.{key}={v!r}: expected an integer from {low} to 2**31 - 1"
                          + (" or null (auto)" if nullable else ""))


def validate_sweep(spec: SweepSpec) -> None:
    where = spec.path or spec.name
    try:
        check_name(spec.name, "name")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not spec.search_space:
        raise ConfigError(f"{where}: search_space: expected at least one key")
    for key, dist in spec.search_space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in SPACE_KINDS:
            raise ConfigError(f"{where}: search_space.{key}: expected one of {{{', '.join(SPACE_KINDS)}: ...}}")
        kind, arg = next(iter(dist.items()))
        if kind in ("grid", "choice") and (not isinstance(arg, list) or not arg):
            raise ConfigError(f"{where}: search_space.{key}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint"):
            if not (isinstance(arg, list) and len(arg) == 2
                    and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in arg)
                    and arg[0] < arg[1]):
                raise ConfigError(f"{where}: search_space.{key}.{kind}: expected [low, high], finite numbers "
                                  "with low < high")
            if kind == "randint" and not all(isinstance(a, int) for a in arg):
                raise ConfigError(f"{where}: search_space.{key}.randint: expected integer bounds")
            if kind == "loguniform" and arg[0] <= 0:
                raise ConfigError(f"{where}: search_space.{key}.loguniform: expected low > 0")
    s = spec.scheduler
    if s.get("kind") not in ("asha", "fifo"):
        raise ConfigError(f"{where}: scheduler.kind {s.get('kind')!r}: expected asha or fifo")
    unknown = set(s) - {"kind", "grace_period", "reduction_factor", "max_t"}
    if unknown:
        raise ConfigError(f"{where}: scheduler: unknown key {sorted(unknown, key=str)[0]!r}")
    for key, low in (("grace_period", 1), ("max_t", 1), ("reduction_factor", 2)):  # ASHA's own assertions
        _need_int(s, key, low, f"{where}: scheduler")
    b = spec.budget
    if set(b) - BUDGET_KEYS:
        raise ConfigError(f"{where}: budget: unknown key {sorted(set(b) - BUDGET_KEYS, key=str)[0]!r}")
    for key in SPEND_KEYS:
        v, limit = b.get(key), key.startswith("max_")
        number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if v is not None and not (number and (v > 0 if limit else v >= 0)):
            raise ConfigError(f"{where}: budget.{key}={v!r}: expected a finite number "
                              f"{'> 0' if key.startswith('max_') else '>= 0'} or null")
    _need_int(b, "max_failures", 0, f"{where}: budget")
    _need_int(b, "num_samples", 1, f"{where}: budget")
    _need_int(b, "max_concurrent_trials", 1, f"{where}: budget", nullable=True)
    # every discrete combination must make a valid training config (no Ray needed), and so must each
    # continuous key at both ends of its range
    for overrides in [*discrete_overrides(spec), *range_ends(spec)]:
        try:
            load_config(spec.base, spec.base_overrides(overrides))
        except ConfigError as e:
            raise ConfigError(f"{where}: trial with {' '.join(overrides) or 'the base config'}: {e}") from None
    if s["kind"] == "asha":
        epochs = load_config(spec.base, spec.base_overrides()).train.epochs
        max_t = s.get("max_t", epochs)
        if s.get("grace_period", 1) > max_t:
            raise ConfigError(f"{where}: scheduler.grace_period={s['grace_period']}: expected at most max_t={max_t}"
                              f"{'' if 'max_t' in s else ' (train.epochs)'}")


def discrete_overrides(spec: SweepSpec) -> list[list[str]]:
    """The cartesian product of grid and choice values, continuous keys at their lower bound."""
    axes = []
    for key, dist in spec.search_space.items():
        kind, arg = next(iter(dist.items()))
        values = arg if kind in ("grid", "choice") else [arg[0]]
        axes.append([expand(key, v) for v in values])
    return [sum(combo, []) for combo in itertools.product(*axes)]


def range_ends(spec: SweepSpec) -> list[list[str]]:
    """Each continuous key at the top of its range (randint's high is exclusive), the other keys at
    their first value (a grid's or choice's first entry, a range's low end): a range that reaches
    impossible values (dropout up to 5) is refused like a bad grid entry."""
    lows = {key: next(iter(dist.values()))[0] for key, dist in spec.search_space.items()}
    out = []
    for key, dist in spec.search_space.items():
        kind, arg = next(iter(dist.items()))
        if kind in ("uniform", "loguniform", "randint"):
            top = arg[1] - 1 if kind == "randint" else arg[1]
            out.append([o for k, low in lows.items() if k != key for o in expand(k, low)] + expand(key, top))
    return out


def trial_count(spec: SweepSpec) -> int:
    """Trials the sweep creates: the grid's size times num_samples (choices and ranges are sampled)."""
    n = spec.budget["num_samples"]
    for dist in spec.search_space.values():
        kind, arg = next(iter(dist.items()))
        n *= len(arg) if kind == "grid" else 1
    return n


def report_dir(name: str) -> str:
    """Where `vis4mer sweep` and `vis4mer report` save a sweep's plots locally."""
    return str(Path("reports") / name)
