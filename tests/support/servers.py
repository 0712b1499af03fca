"""Real servers on loopback for the tests: moto's S3, `mlflow server`, and a TCP proxy that can cut
either off. Started on free ports, waited for with a deadline, stopped by PID."""
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
        self.requests: list[str] = []  # the request line of every request passed through (e.g. "GET /b/k ...")
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
                if upstream:
                    self.requests += [ln.decode("latin-1") for ln in data.split(b"\r\n")
                                      if ln[:8].split(b" ")[0] in (b"GET", b"HEAD", b"PUT", b"POST", b"DELETE")]
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
