"""Shared fixtures: real servers on loopback, one Ray instance per session.

Everything here runs inside ../shared/tools/loopback (make test does): Ray rewrites 127.0.0.1 to
the machine's routable address otherwise. Servers are started on free ports, waited for with a
deadline, and stopped by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train knobs for a test session's few-second runs on one machine (every Ray this session starts
# inherits them: the session's, `vis4mer` subprocesses', test_jobs' cluster nodes): the controller
# polls its workers every 0.5 s, not 2 s (a run ends ~2 polls after its last report), and starts
# no PreemptionWatcher actor (a node drain never happens here; one process fewer per run, ~1.3 s
# of CPU on this 2-core machine). Neither changes what the tests check.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
# Test credentials for the moto S3 server, set before Ray starts so that Train workers inherit
# them (as workers on a real cluster get theirs from their environment or instance identity).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, deadline_s: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except Exception:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {deadline_s} s")


def stop_pid(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class S3Server:
    """A moto S3-protocol server in its own process on 127.0.0.1 (restartable on the same port)."""

    def __init__(self, port: int, env: dict | None = None):
        self.port, self.env, self.proc = port, env or {}, None
        self.endpoint = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, **self.env})
        wait_http(self.endpoint, 30, self.proc)

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test, made through s3fs (the path users' code takes)."""
    import s3fs

    fs = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3_server.endpoint)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    fs.mkdir(name)
    yield name, fs
    fs.rm(name, recursive=True)


RAY_SESSION: dict = {}  # the session's Ray: "dir", its session directory (worker logs under logs/)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (each worker importing torch costs ~0.4 GiB)."""
    import ray
    from ray.data import DataContext

    # the dashboard (State API) is what frees the workers of a trial that Tune stops (ASHA)
    ctx = ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=True,
                   log_to_driver=False, logging_level="ERROR")
    RAY_SESSION["dir"] = Path(ctx.address_info["session_dir"])
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    yield ray
    ray.shutdown()


class MlflowServer:
    """A real `mlflow server` (sqlite backend) on 127.0.0.1, in its own process group; restartable on
    the same port and store. (An outage during training puts a TcpProxy in front of it instead.)"""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for attempt in range(5):  # a restart can find the port not yet released by the last server
            self.proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                                          "--default-artifact-root", str(self.root / "artifacts"),
                                          "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
            try:
                wait_http(self.uri + "/health", 60, self.proc)
                return
            except RuntimeError:
                if attempt == 4:
                    raise
                self.stop()
                time.sleep(1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        if self.proc is not None:
            deadline = time.time() + 15
            while time.time() < deadline:  # until the workers (which hold the port) are gone too
                try:
                    os.killpg(self.proc.pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server.uri
    finally:
        server.stop()


class TcpProxy:
    """A loopback TCP proxy in front of a server. `down()` drops every open connection and, until
    `up()`, answers each new one by reading its first request line and resetting it: an endpoint
    that has gone away, which also records what the clients tried meanwhile (`refused`, e.g.
    "GET /bucket/data/part-0.parquet HTTP/1.1"). `down_on(b" /bucket/runs/")` goes down by itself at
    the first request for such a path, that request included (`tripped` is set): an outage that
    surely hits that kind of request. The server behind it keeps its state."""

    def __init__(self, target_port: int):
        import threading

        self.target, self.port = target_port, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock, self.conns, self.listener = threading.Lock(), set(), None
        self.serving, self.refused = False, []
        self.trip, self.tripped = None, threading.Event()

    def down_on(self, pattern: bytes) -> None:
        self.tripped.clear()
        self.trip = pattern

    def up(self) -> None:
        import threading

        if self.listener is None:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", self.port))
            ls.listen(64)
            self.listener = ls
            threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        self.serving = True

    def down(self) -> None:
        self.serving = False
        with self.lock:
            conns, self.conns = list(self.conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def close(self) -> None:
        self.down()
        ls, self.listener = self.listener, None
        if ls is not None:
            ls.close()

    def _accept(self, ls) -> None:
        import threading

        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # closed by close()
            if not self.serving:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns.update((client, server))
            for a, b, upstream in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, upstream), daemon=True).start()

    def _refuse(self, client) -> None:
        import struct

        data = b""
        try:
            client.settimeout(2)
            while b"\r\n" not in data and len(data) < 8192 and (chunk := client.recv(4096)):
                data += chunk
        except OSError:
            pass
        if data:
            self.refused.append(data.split(b"\r\n", 1)[0].decode("latin-1"))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
        client.close()

    def _pump(self, src, dst, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                trip = self.trip
                if upstream and trip is not None and trip in data:
                    self.trip = None
                    self.refused += [ln.decode("latin-1") for ln in data.split(b"\r\n") if trip in ln][:1]
                    self.down()
                    self.tripped.set()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()  # every socket is the source of exactly one pump
            with self.lock:
                self.conns.discard(src)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A small synthetic_order dataset: 16 train videos of 32..40 frames x 2 tokens x 8 dims."""
    from datasets.synthetic import write_synthetic

    uri = str(tmp_path_factory.mktemp("data") / "synthetic_order")
    write_synthetic(uri, videos=(16, 8, 8), frames=40, min_frames=32, tokens=2, dim=8, seed=0)
    return uri


def listening_sockets() -> dict[tuple[str, int], str]:
    """Every listening TCP socket in this network namespace, from /proc/net/tcp and tcp6:
    (ip, port) -> socket inode."""
    import ipaddress

    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, port = fields[1].split(":")
            raw = bytes.fromhex(addr)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out[(str(ipaddress.ip_address(raw)), int(port, 16))] = fields[9]
    return out


def is_loopback(ip: str) -> bool:
    import ipaddress

    a = ipaddress.ip_address(ip)
    return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)


def socket_owner(inode: str) -> str:
    """The command line (a Ray worker's is its process title, e.g. "ray::RayTrainWorker") of the
    process holding socket `inode`, or "" if it is gone."""
    target = f"socket:[{inode}]"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (proc / "fd").iterdir()):
                return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return ""


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    listened: dict  # (ip, port) -> owner, for every socket that started listening while it ran
    # (the owner's command line is looked up for sockets not on loopback only)


@pytest.fixture(scope="session")
def cli_train_run(synthetic_dataset, tmp_path_factory) -> CliRun:
    """One `vis4mer train` end to end, as a user runs it: its own local Ray, the embedded MLflow
    store in its working dir. Shared by the test of what it prints and records and the test of what
    it listens on (a local Ray costs ~15 s here: one, not two). While it runs, the listening sockets
    of this network namespace are sampled every 0.25 s."""
    import threading

    cwd = tmp_path_factory.mktemp("cli_train")
    args = [f"data.uri={synthetic_dataset}", f"run.storage_path={cwd}/runs", "model.d_model=16", "model.n_layers=2",
            "model.d_state=8", "model.dropout=0.0", "data.batch_size=16", "data.eval_batch_size=16",
            "train.epochs=1", "train.seed=3", "schedule.kind=constant", "optim.lr=0.01", "data.shuffle_files=false",
            "run.name=cli"]
    root = Path(__file__).resolve().parents[1]
    before = set(listening_sockets())
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train",
                             str(root / "sweeps" / "train_synthetic.yaml"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, start_new_session=True)
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(zip(("stdout", "stderr"), proc.communicate())), daemon=True)
    reader.start()
    listened: dict = {}
    deadline = time.monotonic() + 400
    while reader.is_alive() and time.monotonic() < deadline:
        for sock, inode in listening_sockets().items():
            if sock not in before and sock not in listened:
                listened[sock] = "" if is_loopback(sock[0]) else socket_owner(inode)
        time.sleep(0.25)
    if reader.is_alive():
        os.killpg(proc.pid, signal.SIGKILL)
        reader.join(30)
        raise TimeoutError("vis4mer train ran for more than 400 s")
    return CliRun(proc.returncode, out["stdout"], out["stderr"], cwd, listened)
