"""`vis4mer train` (one Ray Train run, tracked in MLflow) and `vis4mer models` (the model registry)."""
from __future__ import annotations


def _train(a) -> int:
    from vis4mer.orchestrator.train.config import load_config

    cfg = load_config(a.config, a.overrides)  # every check before any Ray work
    from vis4mer.orchestrator.train.driver import run_training
    from vis4mer.orchestrator.train.progress import EpochProgress

    out = run_training(cfg, address=a.address, callbacks=[EpochProgress(cfg.train.epochs)])
    print(f"run {out.name} finished")
    if out.run_id:
        print(f"mlflow run id: {out.run_id}")
    final = {k: round(v, 5) if isinstance(v, float) else v for k, v in out.metrics.items()}
    print(f"final metrics: {final}")
    return 0


def _models(a) -> int:
    from vis4mer.model import ViS4mer, list_variants, variant_config

    for name in list_variants():
        cfg = variant_config(name)
        n = sum(p.numel() for p in ViS4mer(cfg).parameters())
        print(f"{name:20s} l_max={cfg.l_max:6d} d_input={cfg.d_input:5d} stages={cfg.n_layers} "
              f"kernel={cfg.kernel} params={n:,}")
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train on Ray Train (local Ray, or --address / RAY_ADDRESS), tracked in MLflow")
    t.add_argument("config", help="training config YAML")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-3 scaling.num_workers=2")
    t.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    t.set_defaults(func=_train)

    m = sub.add_parser("models", help="list the registered model variants")
    m.set_defaults(func=_models)
