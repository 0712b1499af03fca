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
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
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


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session (each worker importing torch costs ~0.4 GiB)."""
    import ray
    from ray.data import DataContext

    # the dashboard (State API) is what frees the workers of a trial that Tune stops (ASHA)
    ray.init(address="local", num_cpus=4, object_store_memory=512 * 2**20, include_dashboard=True,
             log_to_driver=False, logging_level="ERROR")
    DataContext.get_current().enable_progress_bars = False
    DataContext.get_current().print_on_execution_start = False
    yield ray
    ray.shutdown()


class MlflowServer:
    """A real `mlflow server` (sqlite backend) on 127.0.0.1, in its own process group; restartable on
    the same port and store (to take the tracking server away for a while)."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen([exe, "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                                      "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
                                      "--port", str(self.port), "--workers", "1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        wait_http(self.uri + "/health", 60, self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
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
    """A loopback TCP proxy in front of a server: `down()` refuses and drops every connection, as an
    endpoint that has gone away; `up()` serves again. The server behind it keeps its state."""

    def __init__(self, target_port: int):
        import threading

        self.target, self.port = target_port, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock, self.conns, self.listener = threading.Lock(), set(), None

    def up(self) -> None:
        import threading

        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        self.listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def down(self) -> None:
        ls, self.listener = self.listener, None
        if ls is not None:
            ls.close()
        with self.lock:
            conns, self.conns = list(self.conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self, ls) -> None:
        import threading

        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.conns.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
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
