"""`vis4mer k8s ...`: render a KubeRay RayJob for a sweep, validate manifests against the KubeRay CRDs."""
from __future__ import annotations

import shlex
import sys

from vis4mer.orchestrator.cli.args import Parser, non_negative_int, positive_int
from vis4mer.orchestrator.files import one_line


def _command_line(a) -> str:
    flags = [("--image", a.image), ("--workers", a.workers), ("--gpus-per-worker", a.gpus_per_worker),
             ("--cpus-per-worker", a.cpus_per_worker), ("--memory", a.memory), ("--secret", a.secret),
             ("--mlflow-uri", a.mlflow_uri), ("--namespace", a.namespace), ("--name", a.name),
             ("--ttl-seconds", a.ttl_seconds), ("--out", a.out)]
    words = ["vis4mer", "k8s", "render", a.sweep, *a.overrides, *(["--resume"] if a.resume else [])]
    for flag, value in flags:
        if value is not None:
            words += [flag, str(value)]
    return shlex.join(words)


def _render(a) -> int:
    from vis4mer.orchestrator.deploy.k8s import render, validate_manifest
    from vis4mer.orchestrator.files import dump_yaml, write_atomic
    from vis4mer.orchestrator.sweep.spec import load_sweep

    spec = load_sweep(a.sweep)  # the file's own overrides; the command line's go into the entrypoint
    job, sizing = render(spec, image=a.image, workers=a.workers, gpus_per_worker=a.gpus_per_worker,
                         cpus_per_worker=a.cpus_per_worker, memory=a.memory, secret_name=a.secret,
                         mlflow_uri=a.mlflow_uri, namespace=a.namespace, overrides=a.overrides, name=a.name,
                         ttl_seconds=a.ttl_seconds, resume=a.resume)
    validate_manifest(job, where="rendered RayJob")  # before anything is written
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    header = [f"RayJob for sweep {spec.name!r}, rendered by: {_command_line(a)}",
              f"Apply:  kubectl apply -f {a.out or 'FILE'}   (the Secret {a.secret} must exist in namespace {ns})",
              f"Watch:  kubectl get rayjob {name} -n {ns} -w;  kubectl logs -n {ns} -f job/{name}",
              f"Worker pods: 0 to {a.workers}, each {sizing.pod_gpus} GPU(s), {sizing.pod_cpus} CPUs, {a.memory}; "
              f"at most {sizing.max_trials} trial(s) at once at full size"]
    text = dump_yaml(job, header)
    if a.out:
        write_atomic(a.out, text)
        print(f"wrote {one_line(a.out)}: RayJob {name} (namespace {ns})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    for note in sizing.notes:  # after the output: an error above stays the one line on stderr
        print(f"vis4mer k8s render: note: {note}", file=sys.stderr)
    return 0


def _validate(a) -> int:
    from vis4mer.orchestrator.deploy.k8s import load_manifests, validate_manifest

    for path in a.files:
        docs = load_manifests(path)
        for i, doc in enumerate(docs):
            where = path if len(docs) == 1 else f"{path} (document {i + 1})"
            validate_manifest(doc, where=where)
            print(f"ok: {where}: {doc['kind']} {doc['metadata']['name']}")
    return 0


def register(sub) -> None:
    k = sub.add_parser("k8s", help="Kubernetes (KubeRay): render a RayJob for a sweep, validate manifests")
    ksub = k.add_subparsers(dest="k8s_command", required=True, parser_class=Parser)

    r = ksub.add_parser("render", help="a RayJob running the sweep on an autoscaling GPU cluster (YAML)",
                        description="Renders a RayJob for SWEEP.yaml, validates it against the KubeRay CRD "
                                    "schemas, then writes it to --out (or stdout). Sizing notes go to stderr.")
    r.add_argument("sweep", help="sweep YAML (sweeps/*.yaml; the image holds the same file)")
    r.add_argument("overrides", nargs="*", help="key=value overrides of the base config, passed to `vis4mer sweep` "
                                                "(data.uri and run.storage_path must be object-store URIs)")
    r.add_argument("--image", required=True,
                   help="the vis4mer image (Dockerfile), e.g. registry.example.com/vis4mer:0.1.0")
    r.add_argument("--workers", type=positive_int, required=True,
                   help="the most GPU worker pods the autoscaler may start")
    r.add_argument("--gpus-per-worker", type=positive_int, required=True, help="nvidia.com/gpu per worker pod")
    r.add_argument("--cpus-per-worker", type=positive_int,
                   help="CPUs per worker pod (default: GPUs x (scaling.cpus_per_worker + 1 for data reads) "
                        "+ 1 for trial drivers)")
    r.add_argument("--memory", default="64Gi", help="memory per worker pod, a Kubernetes quantity (default 64Gi)")
    r.add_argument("--secret", default="vis4mer-credentials",
                   help="Secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY[, MLFLOW_TRACKING_TOKEN]")
    r.add_argument("--mlflow-uri", help="MLflow server reachable from the pods (no credentials in it), "
                                        "e.g. http://mlflow.mlflow.svc:5000")
    r.add_argument("--namespace", default="default")
    r.add_argument("--name", help="RayJob name (default: vis4mer-<sweep name>)")
    r.add_argument("--ttl-seconds", type=non_negative_int, default=600,
                   help="delete the cluster this long after the job ends (default 600)")
    r.add_argument("--resume", action="store_true", help="the job continues the interrupted sweep from "
                                                         "run.storage_path (vis4mer sweep --resume)")
    r.add_argument("--out", help="output file (default: stdout); written only if the RayJob validates")
    r.set_defaults(func=_render)

    v = ksub.add_parser("validate", help="check RayJob / RayCluster YAML against the KubeRay CRD schemas")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=_validate)
