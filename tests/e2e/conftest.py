"""Shared fixtures for the end-to-end tests: the tern binary and models."""
import os
import pathlib
import subprocess

import pytest

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
