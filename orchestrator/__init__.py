"""vis4mer's orchestrator: configs, Ray Train runs, Ray Tune sweeps, MLflow, Ray jobs, clusters.

Grouped by what the user does, one way down (docs/architecture.md; tests/test_architecture.py):

    cli/      the `vis4mer` command: argument parsing, one module per command group
    deploy/   Ray jobs, KubeRay manifests, cloud-launcher configs
    sweep/    sweep specs, the Tune run, its callbacks, `best`, `report`, the demo sweep
    train/    the training config, the driver, the per-worker loop, MLflow tracking
    *.py      small helpers every layer may use (files, secret names)

A layer imports only from the layers below it; vis4mer.model and vis4mer.datasets import nothing
from here.
"""
