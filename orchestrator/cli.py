"""The `vis4mer` command line. Subcommands are added here as the platform grows.

User errors (bad options, bad values) print one line naming the culprit and exit with code 2,
without a traceback.
"""
from __future__ import annotations

import argparse
import sys

from orchestrator import cloud_cli, data_cli, extract_cli, jobs_cli, k8s_cli
from orchestrator.cli_types import positive_int


class UserError(Exception):
    """An error in what the user asked for: reported as one line, exit code 2."""


def _cmd_demo(args) -> int:
    if args.model_only:
        from orchestrator.demo import run_demo

        print("vis4mer demo --model-only: temporal-order task (two events far apart in a noisy clip of "
              f"{args.length} steps); chance is 50 %", flush=True)
        run_demo(epochs=args.epochs, length=args.length, seed=args.seed)
        return 0
    from orchestrator.demo_sweep import run_demo_sweep

    return run_demo_sweep(data_uri=args.data, overrides=args.overrides, address=args.address)


def _cmd_models(args) -> int:
    from model import ViS4mer, list_variants, variant_config

    for name in list_variants():
        cfg = variant_config(name)
        n = sum(p.numel() for p in ViS4mer(cfg).parameters())
        print(f"{name:20s} l_max={cfg.l_max:6d} d_input={cfg.d_input:5d} stages={cfg.n_layers} "
              f"kernel={cfg.kernel} params={n:,}")
    return 0


def _cmd_train(args) -> int:
    from orchestrator.config import load_config

    cfg = load_config(args.config, args.overrides)  # every check before any Ray work
    from orchestrator.progress import EpochProgress
    from orchestrator.trainer import run_training

    out = run_training(cfg, address=args.address, callbacks=[EpochProgress(cfg.train.epochs)])
    print(f"run {out.name} finished")
    if out.run_id:
        print(f"mlflow run id: {out.run_id}")
    final = {k: round(v, 5) if isinstance(v, float) else v for k, v in out.metrics.items()}
    print(f"final metrics: {final}")
    return 0


def _cmd_sweep(args) -> int:
    from orchestrator.sweep import load_sweep, run_sweep

    if args.resume:
        spec = load_sweep(args.resume_file or f"sweeps/{args.sweep}.yaml", args.overrides)
    else:
        if args.sweep is None:
            raise UserError("expected SWEEP.yaml (or --resume NAME)")
        spec = load_sweep(args.sweep, args.overrides)
    if args.max_concurrent_trials:
        spec.budget["max_concurrent_trials"] = args.max_concurrent_trials
    grid, parent = run_sweep(spec, resume=args.resume, address=args.address)
    ok = [r for r in grid if r.metrics]
    print(f"sweep {spec.name}: {len(grid)} trials, {len(ok)} reported, {sum(1 for r in grid if r.error)} errored")
    if parent:
        print(f"mlflow parent run id: {parent}")
        from orchestrator.sweep_summary import print_sweep_results

        print_sweep_results(spec)
    return 0


def _cmd_report(args) -> int:
    from orchestrator.report import make_report
    from orchestrator.sweep import report_dir
    from orchestrator.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    paths = make_report(uri, args.experiment, args.name, args.out or report_dir(args.name), args.metric)
    for path in paths:
        print(f"plot: {path}")
    print(f"logged to the parent run of sweep {args.name!r} (artifacts report/)")
    return 0


def _cmd_best(args) -> int:
    from orchestrator.best import best_trials, format_table, write_best_config
    from orchestrator.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    metric, mode, rows = best_trials(uri, args.experiment, args.sweep, args.metric, args.top)
    print(f"best trials by {metric} ({mode}):")
    print(format_table(metric, rows))
    print(f"wrote {write_best_config(uri, rows[0], args.out)}")
    return 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vis4mer", description="ViS4mer long-video models on Ray: train, sweep, track.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="the main job: the demo sweep on a local Ray (synthesises its data if absent)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the demo sweep's base config")
    d.add_argument("--data", default="data/synthetic_order", help="the demo dataset (written if absent)")
    d.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    d.add_argument("--model-only", action="store_true", help="instead: a one-minute in-memory model demo, no Ray")
    d.add_argument("--epochs", type=positive_int, default=15, help="with --model-only")
    d.add_argument("--length", type=positive_int, default=256, help="with --model-only")
    d.add_argument("--seed", type=int, default=0, help="with --model-only")
    d.set_defaults(func=_cmd_demo)
    m = sub.add_parser("models", help="list the registered model variants")
    m.set_defaults(func=_cmd_models)
    data_cli.register(sub, positive_int)
    k8s_cli.register(sub, positive_int)
    cloud_cli.register(sub, positive_int)
    jobs_cli.register(sub, positive_int)
    extract_cli.register(sub, positive_int)
    t = sub.add_parser("train", help="train on Ray Train (local Ray, or --address / RAY_ADDRESS), tracked in MLflow")
    t.add_argument("config", help="training config YAML")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-3 scaling.num_workers=2")
    t.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    t.set_defaults(func=_cmd_train)
    w = sub.add_parser("sweep", help="run a sweep (sweeps/*.yaml) on Ray Tune, tracked in MLflow")
    w.add_argument("sweep", nargs="?", help="sweep YAML (with --resume: the sweep's name)")
    w.add_argument("overrides", nargs="*", help="key=value overrides of the base training config (a searched key given here is fixed)")
    w.add_argument("--resume", action="store_true", help="continue an interrupted sweep without rerunning finished trials")
    w.add_argument("--resume-file", help="with --resume: the sweep YAML (default sweeps/NAME.yaml)")
    w.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    w.add_argument("--max-concurrent-trials", type=positive_int,
                   help="override budget.max_concurrent_trials (e.g. for a cluster that scales up from 0 nodes)")
    w.set_defaults(func=_cmd_sweep)
    b = sub.add_parser("best", help="best trials of a sweep, from MLflow only; writes the best config as a training YAML")
    b.add_argument("--sweep", help="sweep name (default: every sweep in the experiment)")
    b.add_argument("--metric", help="default: the sweep's metric")
    b.add_argument("--top", type=positive_int, default=5)
    b.add_argument("--tracking-uri", help="default: sqlite:///$PWD/mlflow.db")
    b.add_argument("--experiment", help="MLflow experiment (default: search them all)")
    b.add_argument("--out", default="best.yaml")
    b.set_defaults(func=_cmd_best)
    r = sub.add_parser("report", help="plots of a sweep from MLflow (final metric vs d_state, depth, pooling; "
                                      "learning curves), saved locally and logged to its parent run")
    r.add_argument("name", help="sweep name")
    r.add_argument("--metric", help="default: the sweep's metric")
    r.add_argument("--tracking-uri", help="default: sqlite:///$PWD/mlflow.db")
    r.add_argument("--experiment", help="MLflow experiment (default: search them all)")
    r.add_argument("--out", help="folder for the PNGs (default: reports/NAME)")
    r.set_defaults(func=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from datasets.format import DatasetError
    from datasets.storage import StorageError
    from orchestrator.config import ConfigError

    try:
        return args.func(args)
    except (UserError, ConfigError, ValueError, KeyError, DatasetError, StorageError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"vis4mer {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
