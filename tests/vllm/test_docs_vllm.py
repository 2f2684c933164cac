"""docs/vllm.md's quick start, run as written in a fresh clone of this repository: the blocks
marked `<!-- docs-test: NAME -->` (env: build or check the vLLM environment and the plugin;
serve: `make serve-vllm`; check: a chat completion over a demo adapter and vLLM's families in
/metrics), with PORT set to a free port. The clone has no built kernel, so the environment's
kernel step builds it there (minutes on 2 cores); the shared vLLM environment is re-linked to
this checkout afterwards. Slow: 16-19 minutes on the busy 2-core development machine (load 9-14),
most of it the kernel build."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from goat_runtime.vllm_plugin.venv import ensure_vllm_venv
from tests.vllm.conftest import REPO, VENV
from tests.vllm.serving import call, free_port

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

BLOCK = re.compile(r"<!-- docs-test: (\w+) -->\n```bash\n(.*?)```", re.DOTALL)


def doc_blocks(text: str) -> dict[str, str]:
    return dict(BLOCK.findall(text))


def test_doc_blocks_are_found() -> None:
    blocks = doc_blocks((REPO / "docs" / "vllm.md").read_text())
    assert set(blocks) == {"env", "serve", "check"}, sorted(blocks)
    assert "make serve-vllm" in blocks["serve"]


@pytest.fixture
def clone(vllm_python, tmp_path):
    """A fresh clone of this checkout's HEAD; afterwards the environment is linked back."""
    target = tmp_path / "goat-serve"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(target)], check=True)
    assert not list((target / "goat_runtime").glob("_C*.so"))
    yield target
    ensure_vllm_venv(VENV, REPO)


def bash(script: str, cwd: Path, env: dict[str, str], timeout: float
         ) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_quick_start_runs_as_written(clone: Path, tmp_path: Path) -> None:
    blocks = doc_blocks((clone / "docs" / "vllm.md").read_text())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(GOAT_VLLM_VENV=str(VENV), PORT=str(port))

    env_run = bash(blocks["env"], clone, env, timeout=1200)
    assert env_run.returncode == 0, env_run.stderr[-4000:]
    assert "[5/5] building the C++ kernel" in env_run.stderr, env_run.stderr[-4000:]
    assert list((clone / "goat_runtime").glob("_C*.so"))

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", "-euo", "pipefail", "-c", blocks["serve"]],
                                  cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, log.read_text()[-6000:]
            try:
                if call(f"http://127.0.0.1:{port}", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(2)
        checked = bash(blocks["check"], clone, env, timeout=300)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    assert checked.returncode == 0, checked.stderr
    assert '"choices"' in checked.stdout, checked.stdout
    assert int(checked.stdout.split()[-1]) > 10, checked.stdout  # vLLM's samples, counted
