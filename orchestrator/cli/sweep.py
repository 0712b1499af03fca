"""`vis4mer sweep`, `best`, `report` and `demo`: sweeps on Ray Tune and what MLflow knows of them."""
from __future__ import annotations

import argparse

from vis4mer.orchestrator.cli.args import int_between, non_negative_float, positive_int, seed_int
from vis4mer.orchestrator.files import one_line

MODEL_DEMO_MAX_LENGTH = 8192  # its 1,280 in-memory clips of length x 16 values: about 1 GiB at that


def _prices(a) -> dict:
    """--price-per-cpu-hour / --price-per-gpu-hour, as the sweep budget's keys."""
    return {k: v for k, v in (("price_per_cpu_hour", a.price_per_cpu_hour),
                              ("price_per_gpu_hour", a.price_per_gpu_hour)) if v is not None}


def _sweep(a) -> int:
    from vis4mer.orchestrator.sweep.spec import load_sweep
    from vis4mer.orchestrator.train.config import ConfigError, check_name

    if a.resume:
        spec = load_sweep(a.resume_file or f"sweeps/{check_name(a.sweep, '--resume')}.yaml", a.overrides)
    else:
        if a.sweep is None:
            raise ConfigError("expected SWEEP.yaml (or --resume NAME)")
        spec = load_sweep(a.sweep, a.overrides)
    if a.max_concurrent_trials:
        spec.budget["max_concurrent_trials"] = a.max_concurrent_trials
    spec.budget.update(_prices(a))
    from vis4mer.orchestrator.sweep.tune_run import run_sweep

    grid, plan = run_sweep(spec, resume=a.resume, address=a.address)
    ok = [r for r in grid if r.metrics]
    print(f"sweep {spec.name}: {len(grid)} trials, {len(ok)} reported, {sum(1 for r in grid if r.error)} errored")
    if plan.stop_reason:
        print(f"sweep {spec.name}: stopped at its budget: {plan.stop_reason}")
    if plan.parent_run_id:
        print(f"mlflow parent run id: {plan.parent_run_id}")
        from vis4mer.orchestrator.sweep.summary import print_sweep_results

        print_sweep_results(plan)
    return 0


def _best(a) -> int:
    from vis4mer.orchestrator.sweep.best import print_ranking, write_best_config
    from vis4mer.orchestrator.train.config import check_name
    from vis4mer.orchestrator.train.tracking import default_tracking_uri, reading_store

    if a.sweep is not None:
        check_name(a.sweep, "--sweep")
    uri = a.tracking_uri or default_tracking_uri()
    with reading_store(uri):
        winner = print_ranking(uri, a.experiment, a.sweep, a.metric, a.top, a.group_seeds, _prices(a))
        print(f"wrote {one_line(write_best_config(uri, winner, a.out))}")
    return 0


def _report(a) -> int:
    from vis4mer.orchestrator.sweep.report import make_report
    from vis4mer.orchestrator.sweep.spec import report_dir
    from vis4mer.orchestrator.train.config import check_name
    from vis4mer.orchestrator.train.tracking import default_tracking_uri, reading_store

    check_name(a.name, "sweep")
    uri = a.tracking_uri or default_tracking_uri()
    with reading_store(uri):
        paths = make_report(uri, a.experiment, a.name, a.out or report_dir(a.name), a.metric)
    for path in paths:
        print(f"plot: {path}")
    print(f"logged to the parent run of sweep {a.name!r} (artifacts report/)")
    return 0


def _demo(a) -> int:
    if a.model_only:
        from vis4mer.orchestrator.train.model_demo import run_demo

        print("vis4mer demo --model-only: temporal-order task (two events far apart in a noisy clip of "
              f"{a.length} steps); chance is 50 %", flush=True)
        run_demo(epochs=a.epochs, length=a.length, seed=a.seed)
        return 0
    from vis4mer.orchestrator.sweep.demo import run_demo_sweep

    return run_demo_sweep(data_uri=a.data, overrides=a.overrides, address=a.address)


def _add_price_args(p) -> None:
    for unit in ("cpu", "gpu"):
        p.add_argument(f"--price-per-{unit}-hour", type=non_negative_float,
                       help="for the estimated cost (overrides the sweep's budget)")


def register(sub) -> None:
    d = sub.add_parser("demo", help="the main job: the demo sweep on a local Ray (synthesises its data if absent)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the demo sweep's base config")
    d.add_argument("--data", default="data/synthetic_order", help="the demo dataset (written if absent)")
    d.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    d.add_argument("--model-only", action="store_true", help="instead: a one-minute in-memory model demo, no Ray")
    d.add_argument("--epochs", type=positive_int, default=15, help="with --model-only")
    d.add_argument("--length", default=256, help=f"with --model-only (at most {MODEL_DEMO_MAX_LENGTH})",
                   type=int_between(2, MODEL_DEMO_MAX_LENGTH, f"a length from 2 to {MODEL_DEMO_MAX_LENGTH}"))
    d.add_argument("--seed", type=seed_int, default=0, help="with --model-only")
    d.set_defaults(func=_demo)

    w = sub.add_parser("sweep", help="run a sweep (sweeps/*.yaml) on Ray Tune, tracked in MLflow")
    w.add_argument("sweep", nargs="?", help="sweep YAML (with --resume: the sweep's name)")
    w.add_argument("overrides", nargs="*",
                   help="key=value overrides of the base training config (a searched key given here is fixed)")
    w.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep without rerunning finished trials")
    w.add_argument("--resume-file", help="with --resume: the sweep YAML (default sweeps/NAME.yaml)")
    w.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    w.add_argument("--max-concurrent-trials", type=positive_int,
                   help="override budget.max_concurrent_trials (e.g. for a cluster that scales up from 0 nodes)")
    _add_price_args(w)
    w.set_defaults(func=_sweep)

    b = sub.add_parser("best",
                       help="best trials of a sweep, from MLflow only; writes the best config as a training YAML")
    b.add_argument("--sweep", help="sweep name (default: every sweep in the experiment)")
    b.add_argument("--metric", help="default: the sweep's metric")
    b.add_argument("--top", type=positive_int, default=5)
    b.add_argument("--tracking-uri", help="default: sqlite:///$PWD/mlflow.db")
    b.add_argument("--experiment", help="MLflow experiment (default: search them all)")
    b.add_argument("--out", default="best.yaml")
    b.add_argument("--group-seeds", action=argparse.BooleanOptionalAction, default=None,
                   help="rank configurations by the mean over train.seed (default: when the sweep searches seeds)")
    _add_price_args(b)
    b.set_defaults(func=_best)

    r = sub.add_parser("report", help="plots of a sweep from MLflow (final metric vs d_state, depth, pooling; "
                                      "learning curves), saved locally and logged to its parent run")
    r.add_argument("name", help="sweep name")
    r.add_argument("--metric", help="default: the sweep's metric")
    r.add_argument("--tracking-uri", help="default: sqlite:///$PWD/mlflow.db")
    r.add_argument("--experiment", help="MLflow experiment (default: search them all)")
    r.add_argument("--out", help="folder for the PNGs (default: reports/NAME)")
    r.set_defaults(func=_report)
