"""A throwaway two-node Ray cluster for job tests: `ray start --head` and `ray start --address`, each
in its own process group and temp dir, on loopback, run by a Python that has vis4mer's dependencies
but not vis4mer itself (as a cluster built from a stock Ray image): a job must bring vis4mer along."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from tests.support.servers import free_port, wait_http


def ray_env(python_dir: Path | None = None) -> dict:
    """Environment for Ray processes and `vis4mer` clients: no auth, no usage stats, and `python`
    (a job's entrypoint) found in `python_dir` (default: this interpreter's)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env["PATH"] = f"{python_dir or Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def python_without_vis4mer(root: Path) -> Path:
    """A virtual environment that sees this one's packages (a .pth line adds its site-packages) but
    not vis4mer: the editable install's import hook is itself a .pth file there, and .pth files of a
    directory added that way are not run. Returns its python."""
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=120)  # pip from ensurepip
    purelib = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; "
                                   "print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                                  text=True, timeout=60).stdout.strip())
    (purelib / "project-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env / "bin" / "python"


def stop_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def kill_leftovers(root: str, deadline_s: float = 30) -> None:
    """Every process of the cluster (its GCS, raylets, agents and workers name its temp dir on their
    command lines), not only the `ray start` groups: a Ray instance left behind makes Ray's State
    API refuse to choose between it and the session's, and the later sweeps' stopped trials would
    never be torn down."""
    def pids() -> list[int]:
        found = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if root.encode() in (d / "cmdline").read_bytes():
                        found.append(int(d.name))
                except OSError:
                    pass
        return found

    end = time.monotonic() + deadline_s
    while (left := pids()) and time.monotonic() < end:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _own_ports() -> list[str]:
    # every port a node opens at a fixed default (the dashboard agent's 52365, the metrics and
    # runtime-env agents) gets a free one: the session's own local Ray may already hold the defaults
    return [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                             "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
            for arg in (flag, str(free_port()))]


def start_two_node_cluster(root: Path, python: Path, cpus_per_node: int = 3) -> tuple[str, list[subprocess.Popen]]:
    """Head + one worker node, run by `python`; returns (dashboard URL, the `ray start` processes)."""
    port, dash = free_port(), free_port()
    ray = [str(python), "-m", "ray.scripts.scripts"]
    common = ["--num-cpus", str(cpus_per_node), "--object-store-memory", str(256 * 2**20), "--disable-usage-stats",
              "--block"]
    # The nodes' processes name their cluster in RAY_ADDRESS: Ray's State API (which Train's
    # placement-group cleaner calls without an address) otherwise finds two Ray instances on this
    # machine (the session's local one too), refuses to choose, and a finished trial's workers are
    # never freed: the next trial waited for them forever.
    node_env = dict(ray_env(python.parent), RAY_ADDRESS=f"127.0.0.1:{port}")
    procs: list[subprocess.Popen] = []
    head = subprocess.Popen([*ray, "start", "--head", "--port", str(port), "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dash), "--temp-dir", str(root / "head"), *common, *_own_ports()],
                            env=node_env, stdout=open(root / "head.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs.append(head)
    wait_http(f"http://127.0.0.1:{dash}/api/version", 90, head)
    worker = subprocess.Popen([*ray, "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(root / "worker"),
                               *common, *_own_ports()], env=node_env, stdout=open(root / "worker.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(worker)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        out = subprocess.run([*ray, "status", "--address", f"127.0.0.1:{port}"], env=ray_env(python.parent),
                             capture_output=True, text=True, timeout=60)
        if out.stdout.count("node_") >= 2 or f"{2 * cpus_per_node}.0 CPU" in out.stdout:
            return f"http://127.0.0.1:{dash}", procs
        if worker.poll() is not None:
            raise RuntimeError((root / "worker.log").read_text()[-2000:])
        time.sleep(1)
    raise TimeoutError("the worker node did not join: " + out.stdout[-1000:])
