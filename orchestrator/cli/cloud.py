"""`vis4mer cloud ...`: render and validate cluster-launcher configs (`ray up`) for GPU sweeps."""
from __future__ import annotations

import sys

from vis4mer.orchestrator.cli.args import Parser, positive_int
from vis4mer.orchestrator.files import one_line, write_atomic


def _render(a) -> int:
    from vis4mer.orchestrator.deploy.cloud import (
        cluster_file,
        placeholders,
        render_cluster,
        validate_cluster_config,
    )

    spec = None
    if a.sweep:
        from vis4mer.orchestrator.sweep.spec import load_sweep

        spec = load_sweep(a.sweep)
    cfg = render_cluster(a.provider, spec, workers=a.workers, gpu_type=a.gpu_type, spot=a.spot, region=a.region,
                         image=a.image, cluster_name=a.cluster_name, project=a.project,
                         head_identity=a.head_identity, worker_identity=a.worker_identity,
                         machine_image=a.machine_image)
    validate_cluster_config(cfg, "rendered config")  # nothing is written unless it validates
    text = cluster_file(cfg, a.out)
    if not a.out:
        sys.stdout.write(text)
        return 0
    write_atomic(a.out, text)  # all or nothing
    m = cfg["metadata"]["vis4mer"]
    print(f"wrote {one_line(a.out)}: {a.provider}, CPU-only head + up to {cfg['max_workers']} x {m['instance']} "
          f"({'spot' if a.spot else 'on demand'}); start it with: ray up {one_line(a.out)}")
    left = placeholders(cfg)
    if left:
        print(f"note: replace {' and '.join(left)} in {one_line(a.out)} before `ray up`")
    return 0


def _validate(a) -> int:
    from vis4mer.orchestrator.deploy.cloud import load_cluster_file, validate_cluster_config

    for path in a.files:
        cfg = validate_cluster_config(load_cluster_file(path), path)
        head = cfg["available_node_types"][cfg["head_node_type"]]
        workers = [n for n in cfg["available_node_types"] if n != cfg["head_node_type"]]
        print(f"ok: {path}: {cfg['provider']['type']}, head node type {cfg['head_node_type']!r} "
              f"resources {head['resources']}, "
              f"worker types {', '.join(workers)}, max_workers {cfg['max_workers']} (ray-schema.json and "
              "validate_config pass)")
    return 0


def register(sub) -> None:
    from vis4mer.orchestrator.deploy.cloud import GPU_TYPES

    cloud = sub.add_parser("cloud", help="cloud GPU clusters for sweeps with Ray's cluster launcher (ray up)")
    csub = cloud.add_subparsers(dest="cloud_command", required=True, parser_class=Parser)

    r = csub.add_parser("render", help="write a `ray up` config sized for a sweep (validated before writing)")
    r.add_argument("--provider", required=True, choices=["aws", "gcp"])
    r.add_argument("--sweep", help="sweep YAML: sizes max_workers for its concurrent trials")
    r.add_argument("--workers", type=positive_int, help="max GPU worker nodes (default: from the sweep, else 2)")
    r.add_argument("--gpu-type", default="a100", choices=GPU_TYPES, help="default a100 (8 per node)")
    r.add_argument("--spot", action="store_true", help="spot (aws) / preemptible spot (gcp) GPU workers; "
                                                      "the head stays on demand")
    r.add_argument("--region", help="aws region (default us-west-2) or gcp region/zone (default us-central1)")
    r.add_argument("--image", help="docker image for every node (default: rayproject/ray:<ray version>-py311-gpu)")
    r.add_argument("--cluster-name", help="default: vis4mer-<sweep name>")
    r.add_argument("--project", help="gcp project id (default: the placeholder PROJECT_ID)")
    r.add_argument("--head-identity", help="head's instance-profile ARN (aws) or service-account email (gcp)")
    r.add_argument("--worker-identity", help="workers' instance-profile ARN (aws) or service-account email (gcp)")
    r.add_argument("--machine-image", help="AMI id (aws) or boot image (gcp); default: Ray's DLAMI / a DL VM image")
    r.add_argument("--out", help="output file (default: stdout)")
    r.set_defaults(func=_render)

    v = csub.add_parser("validate", help="check cluster configs against Ray's ray-schema.json and vis4mer's rules")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=_validate)
