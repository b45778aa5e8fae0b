"""Shared fixtures for the end-to-end tests: the tern binary and models."""
import os
import pathlib
import subprocess
import sys
import time

import pytest
import requests

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tern_bin():
    path = os.environ.get("TERN_BIN", str(ROOT / "build" / "tern"))
    if not os.path.exists(path):
        pytest.fail(f"tern binary not found at {path} (run make)")
    return path


def model_path(name):
    files = {
        "smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3-270m": "gemma-3-270m-Q4_K_M.gguf",
    }
    p = MODELS / files[name]
    if not p.exists():
        pytest.fail(f"model {name} missing: run make models")
    return str(p)


@pytest.fixture
def run_tern(tern_bin):
    def run(*args, stdin=None, timeout=600):
        return subprocess.run([tern_bin, *args], input=stdin,
                              capture_output=True, timeout=timeout)
    return run


def slow_mode():
    """True under the sanitizer build: tests trim their workload."""
    return os.environ.get("TERN_SLOW") == "1"


# ---- a running `tern serve`

class TernServer:
    """A `tern serve` child on a free loopback port."""

    def __init__(self, tern_bin, args, log_path):
        import socket
        import time
        import urllib.request
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [tern_bin, "serve", "--port", str(self.port), *args],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tern serve exited {self.proc.returncode}: "
                                   + self.read_log()[-2000:])
            try:
                # /health answers while models load; /ready once loaded
                with urllib.request.urlopen(self.base + "/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("tern serve did not become ready in 60 s")

    def read_log(self):
        self.log.flush()
        return pathlib.Path(self.log_path).read_text(errors="replace")

    def client(self, **kw):
        import openai
        return openai.OpenAI(base_url=self.base + "/v1",
                             api_key=kw.pop("api_key", "none"),
                             max_retries=0, timeout=kw.pop("timeout", 300), **kw)

    def stop(self, timeout=60):
        """SIGTERM, then the exit code (tern drains and exits 0)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tern_bin, tmp_path):
    """start_server(*args) -> TernServer; stopped (and checked to exit 0)
    at the end of the test."""
    servers = []

    def start(*args):
        srv = TernServer(tern_bin, list(args),
                         str(tmp_path / f"serve{len(servers)}.log"))
        servers.append(srv)
        return srv
    yield start
    for srv in servers:
        rc = srv.stop()
        assert rc == 0, f"tern serve exited {rc}: {srv.read_log()[-3000:]}"


@pytest.fixture(scope="module")
def server(tern_bin, tmp_path_factory):
    """One shared SmolLM2 server for a test module (2 threads)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = TernServer(tern_bin, ["-m", model_path("smollm2-135m"), "-t", "2",
                                "--ctx", "2048", "--queue", "64"], str(log))
    yield srv
    rc = srv.stop()
    assert rc == 0, f"tern serve exited {rc}: {srv.read_log()[-3000:]}"


# ---- a real MLflow tracking server (traces, tern eval --mlflow)

def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(d / "mlflow.log", "wb")
    p = subprocess.Popen(
        [exe, "server", "--backend-store-uri", f"sqlite:///{d}/mlflow.db",
         "--artifacts-destination", str(d / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=d)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            pass
        if p.poll() is not None:
            raise RuntimeError("mlflow server exited: " +
                               (d / "mlflow.log").read_text()[-2000:])
        time.sleep(0.5)
    else:
        p.kill()
        raise RuntimeError("mlflow server did not start in 120 s")
    import mlflow
    mlflow.set_tracking_uri(base)
    yield base
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
    log.close()


