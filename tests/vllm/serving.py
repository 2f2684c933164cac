"""goat-serve as a subprocess for the vLLM tests: started from the test suite's python (with
--engine vllm the CLI re-executes itself in the vLLM environment), stopped on exit."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.vllm.conftest import REPO, VENV


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, path: str, body: dict | None = None) -> tuple[int, str]:
    """(status, body text) of a GET (body None) or a JSON POST."""
    request = urllib.request.Request(
        base + path, data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@contextlib.contextmanager
def goat_serve(log: Path, *args: str, env_extra: dict[str, str] | None = None,
               startup_s: float = 600) -> Iterator[str]:
    """`python -m server ARGS --port P`; yields its URL once /health answers."""
    port = free_port()
    env = {**os.environ, "GOAT_VLLM_VENV": str(VENV), **(env_extra or {})}
    env.pop("VLLM_PLUGINS", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server", *args, "--port", str(port),
                                 "--log-level", "warning"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited {proc.returncode}:\n"
                                     f"{log.read_text()[-6000:]}")
            try:
                if call(base, "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not up:\n{log.read_text()[-6000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
