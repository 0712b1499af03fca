"""What a sweep spends, and the Tune stopper that ends it at its budget.

A trial's spend is its measured run time (Tune's `time_total_s`) times what one of its training
runs holds (train.config.run_resources: CPUs, GPUs); a sweep's is the sum over its trials. The
budget (sweep YAML `budget:`) bounds a trial's hours (`max_trial_hours`: that trial stops) and the
sweep's CPU- or GPU-hours (`max_sweep_cpu_hours`, `max_sweep_gpu_hours`: every trial stops, the
sweep ends); prices per hour turn hours into an estimated cost.
"""
from __future__ import annotations

from ray import tune

from vis4mer.orchestrator.train.config import RunResources


def spend(seconds: float, need: RunResources, budget: dict) -> dict[str, float]:
    """CPU-hours, GPU-hours and (with prices) the estimated cost of `seconds` of one run."""
    hours = seconds / 3600
    out = {"cpu_hours": hours * need.cpus, "gpu_hours": hours * need.gpus}
    if budget.get("price_per_cpu_hour") is not None or budget.get("price_per_gpu_hour") is not None:
        out["cost"] = cost(out, budget)
    return out


def cost(hours: dict, prices: dict) -> float:
    """CPU- and GPU-hours at the prices per hour (a missing price counts as 0)."""
    return (hours.get("cpu_hours", 0.0) * (prices.get("price_per_cpu_hour") or 0)
            + hours.get("gpu_hours", 0.0) * (prices.get("price_per_gpu_hour") or 0))


def stop_reason(seconds_by_trial: dict[str, float], need: RunResources, budget: dict) -> str | None:
    """Why the sweep must end (a sweep-wide limit reached), or None."""
    total = spend(sum(seconds_by_trial.values()), need, budget)
    for key, used in (("max_sweep_cpu_hours", total["cpu_hours"]), ("max_sweep_gpu_hours", total["gpu_hours"])):
        limit = budget.get(key)
        if limit is not None and used >= limit:
            return f"budget.{key}={limit:g} reached: {used:.4g} {key.split('_')[2].upper()}-hours used"
    return None


class BudgetStopper(tune.Stopper):
    """Stops a trial past `max_trial_hours`, and every trial once the sweep's CPU- or GPU-hours
    reach their limit (Tune then ends the sweep; its trials keep what they logged)."""

    def __init__(self, budget: dict, need: RunResources):
        self.budget, self.need = budget, need
        self.seconds: dict[str, float] = {}

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.seconds[trial_id] = float(result.get("time_total_s", 0.0))
        limit = self.budget.get("max_trial_hours")
        return limit is not None and self.seconds[trial_id] >= limit * 3600

    def stop_all(self) -> bool:
        return stop_reason(self.seconds, self.need, self.budget) is not None
