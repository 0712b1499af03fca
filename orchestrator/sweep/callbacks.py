"""Live progress of a sweep: one line whenever the trial counts or the best result change.

    [demo 01:42] 2 running, 3 finished, 2 stopped, 0 errored, 1 pending | best val_top1 0.9922 (trial 9a4c_00005: ...)

A Tune `Callback`: Tune calls it in the driver process, which owns the trials, so it sees every
trial's status without asking the cluster. "stopped" are trials the scheduler (ASHA) ended before
their last epoch; "finished" ran all of them.
"""
from __future__ import annotations

import json
import os
import sys
import time

from ray.tune import Callback

from vis4mer.orchestrator.sweep.spec import trial_name
from vis4mer.orchestrator.train.tracking import Tag


class SweepProgress(Callback):
    def __init__(self, name: str, metric: str, mode: str, max_epochs: int, total: int | None = None, stream=None):
        self.name, self.metric, self.mode, self.max_epochs = name, metric, mode, max_epochs
        self.total = total  # Tune creates trials as slots free up: count the rest as pending
        self.stream = stream  # None: sys.stdout at print time (Tune pickles its callbacks with the sweep)
        self.setup()

    def setup(self, **info):
        """Tune calls this when the sweep starts, and again when a saved sweep is resumed."""
        self.start = time.monotonic()
        self.best: tuple[float, str, dict] | None = None
        self.last_line = ""
        self.counts: dict[str, int] = {}
        self._seeded = False

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best[0] if self.mode == "max" else value < self.best[0]

    def stopped_early(self, trial) -> bool:
        it = (trial.last_result or {}).get("training_iteration", 0)
        return trial.status == "TERMINATED" and it < self.max_epochs

    def tally(self, trials) -> dict[str, int]:
        c = {"running": 0, "finished": 0, "stopped": 0, "errored": 0, "pending": 0}
        for t in trials:
            if t.status == "RUNNING":
                c["running"] += 1
            elif t.status == "TERMINATED":
                c["stopped" if self.stopped_early(t) else "finished"] += 1
            elif t.status == "ERROR":
                c["errored"] += 1
            else:  # PENDING, PAUSED
                c["pending"] += 1
        if self.total:
            c["pending"] = max(c["pending"], self.total - sum(v for k, v in c.items() if k != "pending"))
        return c

    def _print(self, trials) -> None:
        self.counts = self.tally(trials)
        line = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        if self.best:
            value, trial_id, params = self.best
            line += f" | best {self.metric} {value:.4g} (trial {trial_id}: {json.dumps(params, sort_keys=True)})"
        if line != self.last_line:  # only changes: a long sweep stays readable
            self.last_line = line
            m, s = divmod(int(time.monotonic() - self.start), 60)
            print(f"[{self.name} {m:02d}:{s:02d}] {line}", file=self.stream or sys.stdout, flush=True)

    # Tune calls the trial hooks before it sets the trial's new status, so counts are taken at the
    # end of each controller step; trial results only update the best so far.
    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if isinstance(value, (int, float)) and self._better(float(value)):
            self.best = (float(value), trial.trial_id, trial.config)

    def on_step_end(self, iteration, trials, **info):
        if not self._seeded:  # a resumed sweep: the restored trials' last results count too
            self._seeded = True
            for t in trials:
                self.on_trial_result(iteration, trials, t, t.last_result or {})
        self._print(trials)

    def on_experiment_end(self, trials, **info):
        self._print(trials)


class TrialRunCloser(Callback):
    """Closes each trial's MLflow child run when Tune ends the trial.

    A trial that the scheduler stops never returns from its training call (Tune ends its actor),
    so its run would stay RUNNING: here it is FINISHED with the tag `vis4mer.stopped_early`. A
    trial that raised is FAILED with its error text (tag `vis4mer.error`, artifact `error.txt`);
    the sweep goes on with the other trials. Trials still running when the whole sweep is stopped
    (its budget: sweep/budget.py) get no completion event: they are closed at the experiment's end.
    Each closed run gets its spend (cpu_hours, gpu_hours, cost).
    """

    def __init__(self, cfg, sweep: str, max_epochs: int, need=None, budget: dict | None = None):
        self.cfg, self.sweep, self.max_epochs = cfg, sweep, max_epochs
        self.need, self.budget = need, budget or {}  # what a trial's run holds: its spend is logged at the end
        self.closed: set[str] = set()

    def _close(self, trial, status: str, tags: dict, error: str | None = None) -> None:
        from vis4mer.orchestrator.sweep.budget import spend
        from vis4mer.orchestrator.train import tracking

        self.closed.add(trial.trial_id)
        seconds = float((trial.last_result or {}).get("time_total_s", 0.0))
        metrics = spend(seconds, self.need, self.budget) if self.need is not None else None
        try:
            tracking.close_run_by_name(self.cfg, trial_name(self.sweep, trial.trial_id), status, tags, error, metrics)
        except Exception as e:  # tracking trouble must not stop the sweep
            print(f"warning: could not close the MLflow run of trial {trial.trial_id}: {e}", file=sys.stderr)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = (trial.last_result or {}).get("training_iteration", 0)
        self._close(trial, "FINISHED", {Tag.STOPPED_EARLY: str(epochs < self.max_epochs).lower()})

    def on_experiment_end(self, trials, **info):
        for trial in trials:
            if trial.trial_id not in self.closed and trial.last_result:  # started, then stopped with the sweep
                self.on_trial_complete(0, trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        text = None
        try:  # Tune has just written it in the trial's local folder; the storage copy syncs later
            if trial.error_file and os.path.exists(trial.error_file):
                with open(trial.error_file) as f:
                    text = f.read()
            else:
                err = trial.get_error()
                text = str(err) if err else None
        except OSError:
            pass
        self._close(trial, "FAILED", {}, text or "the trial failed without an error text")
