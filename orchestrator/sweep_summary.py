"""What `vis4mer sweep` and `vis4mer demo` print when a sweep ends: the best-config table and the
plots, both from MLflow (the same queries as `vis4mer best` and `vis4mer report`)."""
from __future__ import annotations

from orchestrator.best import TrialRow, best_trials, format_table
from orchestrator.config import load_config
from orchestrator.report import make_report
from orchestrator.sweep import SweepSpec, report_dir
from orchestrator.tracking import tracking_uri


def print_sweep_results(spec: SweepSpec, top: int = 5) -> tuple[str, list[TrialRow], list[str]]:
    base = load_config(spec.base, spec.base_overrides())
    uri = tracking_uri(base)
    metric, mode, rows = best_trials(uri, base.tracking.experiment, spec.name, spec.metric, top)
    print(f"best trials by {metric} ({mode}):")
    print(format_table(metric, rows))
    plots = make_report(uri, base.tracking.experiment, spec.name, report_dir(spec.name), metric)
    for path in plots:
        print(f"plot: {path}")
    return metric, rows, plots
