"""What `vis4mer sweep` and `vis4mer demo` print when a sweep ends: the best-config table and the
plots, both from MLflow (the same queries as `vis4mer best` and `vis4mer report`)."""
from __future__ import annotations

from vis4mer.orchestrator.sweep.best import TrialRow, best_trials, format_table
from vis4mer.orchestrator.sweep.report import make_report
from vis4mer.orchestrator.sweep.spec import report_dir
from vis4mer.orchestrator.sweep.tune_run import SweepPlan
from vis4mer.orchestrator.train.tracking import tracking_uri


def print_sweep_results(plan: SweepPlan, top: int = 5) -> tuple[str, list[TrialRow], list[str]]:
    uri, experiment, name = tracking_uri(plan.base), plan.base.tracking.experiment, plan.spec.name
    metric, mode, rows = best_trials(uri, experiment, name, plan.metric, top)
    print(f"best trials by {metric} ({mode}):")
    print(format_table(metric, rows))
    plots = make_report(uri, experiment, name, report_dir(name), metric)
    for path in plots:
        print(f"plot: {path}")
    return metric, rows, plots
