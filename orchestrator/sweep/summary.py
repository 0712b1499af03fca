"""What `vis4mer sweep` and `vis4mer demo` print when a sweep ends: the best-config table and the
plots, both from MLflow (the same queries as `vis4mer best` and `vis4mer report`)."""
from __future__ import annotations

from vis4mer.orchestrator.sweep.best import TrialRow, print_ranking
from vis4mer.orchestrator.sweep.report import make_report
from vis4mer.orchestrator.sweep.spec import report_dir
from vis4mer.orchestrator.sweep.tune_run import SweepPlan
from vis4mer.orchestrator.train.tracking import tracking_uri


def print_sweep_results(plan: SweepPlan, top: int = 5) -> tuple[TrialRow, list[str]]:
    """The ranking and the plots; returns the winner and the plots' paths."""
    uri, experiment, name = tracking_uri(plan.base), plan.base.tracking.experiment, plan.spec.name
    winner = print_ranking(uri, experiment, name, plan.metric, top)
    plots = make_report(uri, experiment, name, report_dir(name), plan.metric)
    for path in plots:
        print(f"plot: {path}")
    return winner, plots
