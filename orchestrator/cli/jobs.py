"""`vis4mer submit` and `vis4mer jobs list|status|logs|stop`: Ray jobs through the Jobs SDK.

The address is the cluster's dashboard (`--address http://HEAD:8265`, else RAY_DASHBOARD_ADDRESS,
else http://127.0.0.1:8265). With Ray's token auth on, the SDK reads the token from RAY_AUTH_TOKEN
or ~/.ray/auth_token (RAY_AUTH_MODE=token).
"""
from __future__ import annotations

import asyncio
import json
import time

from vis4mer.orchestrator.cli.args import Parser, positive_int
from vis4mer.orchestrator.train.config import ConfigError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _sdk_call(fn, job_id: str | None = None):
    """The SDK's HTTP errors (an unknown job id, a refused request) as one line."""
    try:
        return fn()
    except RuntimeError as e:
        msg = str(e).splitlines()[0][:300]
        raise ConfigError(f"job {job_id}: {msg}" if job_id else msg) from None


def _cmd_submit(a) -> int:
    import tempfile

    from vis4mer.orchestrator.deploy import jobs

    with tempfile.TemporaryDirectory(prefix="vis4mer-submit-") as package_dir:  # vis4mer's wheel, until uploaded
        sub = jobs.build_submission(a.config, a.overrides, package_dir, working_dir=a.working_dir, env_names=a.env,
                                    pip=a.pip, submission_id=a.submission_id,
                                    max_concurrent_trials=a.max_concurrent_trials)
        job_id = _sdk_call(lambda: jobs.submit(sub, a.address))
    print(f"submitted job {job_id}: {sub.entrypoint}")
    print(f"runtime env: {json.dumps(jobs.redacted_runtime_env(sub.runtime_env), sort_keys=True)}")
    print(f"follow it: vis4mer jobs logs {job_id} --follow" + (f" --address {a.address}" if a.address else ""))
    if a.wait:
        return _wait(jobs.client(a.address), job_id)
    return 0


def _wait(c, job_id: str) -> int:
    status = None
    while status not in TERMINAL:
        time.sleep(2)
        status = str(_sdk_call(lambda: c.get_job_status(job_id), job_id).value)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def _cmd_list(a) -> int:
    from vis4mer.orchestrator.deploy.jobs import client

    rows = _sdk_call(lambda: client(a.address).list_jobs())
    print(f"{'submission id':<28} {'status':<10} {'started':<19}  entrypoint")
    for j in sorted(rows, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        print(f"{(j.submission_id or j.job_id or '-'):<28} {str(j.status.value):<10} {started:<19}  {j.entrypoint}")
    return 0


def _cmd_status(a) -> int:
    from vis4mer.orchestrator.deploy.jobs import client

    info = _sdk_call(lambda: client(a.address).get_job_info(a.job_id), a.job_id)
    print(f"job {a.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return 0


def _cmd_logs(a) -> int:
    from vis4mer.orchestrator.deploy.jobs import client

    c = client(a.address)
    if not a.follow:
        print(_sdk_call(lambda: c.get_job_logs(a.job_id), a.job_id), end="")
        return 0
    _sdk_call(lambda: c.get_job_status(a.job_id), a.job_id)  # an unknown id fails here, in one line

    async def tail():
        async for chunk in c.tail_job_logs(a.job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
    return 0


def _cmd_stop(a) -> int:
    from vis4mer.orchestrator.deploy.jobs import client

    c = client(a.address)
    stopped = _sdk_call(lambda: c.stop_job(a.job_id), a.job_id)
    if not stopped:
        status = _sdk_call(lambda: c.get_job_status(a.job_id), a.job_id).value
        print(f"job {a.job_id}: already {status}")
        return 0
    print(f"job {a.job_id}: stop requested")
    if a.wait:
        _wait(c, a.job_id)
    return 0


def register(sub) -> None:
    s = sub.add_parser("submit", help="run a sweep or training YAML on a Ray cluster as a Ray job")
    s.add_argument("config", help="sweep YAML (runs `vis4mer sweep`) or training YAML (runs `vis4mer train`)")
    s.add_argument("overrides", nargs="*", help="key=value overrides, passed on to the job")
    s.add_argument("--address", help="the cluster's dashboard, e.g. http://HEAD:8265 (default: "
                                     "RAY_DASHBOARD_ADDRESS, else http://127.0.0.1:8265)")
    s.add_argument("--env", action="append", default=[], metavar="NAME",
                   help="pass this environment variable's value to the job (repeat); for credentials")
    s.add_argument("--pip", action="append", default=[], metavar="REQ", help="pip requirement for the job (repeat)")
    s.add_argument("--working-dir", help="folder shipped as the job's working_dir (default: the project)")
    s.add_argument("--submission-id", help="a stable id (default: Ray's)")
    s.add_argument("--max-concurrent-trials", type=positive_int,
                   help="a sweep's concurrency on a cluster still scaling up (Tune only sees the nodes that are up)")
    s.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it SUCCEEDED")
    s.set_defaults(func=_cmd_submit)

    j = sub.add_parser("jobs", help="Ray jobs on a cluster: list, status, logs, stop")
    js = j.add_subparsers(dest="jobs_command", required=True, parser_class=Parser)
    for name, fn, help_ in (("list", _cmd_list, "every job of the cluster"),
                            ("status", _cmd_status, "a job's status"),
                            ("logs", _cmd_logs, "a job's driver logs"),
                            ("stop", _cmd_stop, "stop a running job")):
        p = js.add_parser(name, help=help_)
        if name != "list":
            p.add_argument("job_id", metavar="ID")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        if name == "stop":
            p.add_argument("--wait", action="store_true", help="wait until it has stopped")
        p.add_argument("--address", help="the cluster's dashboard (default: RAY_DASHBOARD_ADDRESS, else "
                                         "http://127.0.0.1:8265)")
        p.set_defaults(func=fn)
