"""The server on an engine in a process of its own (`--engine-process`): the official openai
client's tests again (imported, so collected here on this module's server), and `python -m
server --engine-process` as a process: metrics from the engine process, SIGTERM stops both
processes, and an engine process that dies stops the server with its cause."""

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from goat_runtime.engine.process_engine import ProcessEngine
from tests.server.conftest import (
    FIXTURE,
    LiveServer,
    copy_adapters,
    start_real_server,
    wait_healthy,
)
from tests.server.exposition import parse_exposition
from tests.server.test_key_file import REPO, free_port
from tests.server.test_openai_client import *  # noqa: F403  (the client's tests, on this server)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_real_server(tmp_path_factory.mktemp("engine-process"),
                             engine_class=ProcessEngine)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


def engine_pid(server_pid: int) -> int:
    """The server's engine process (its one child started by multiprocessing's spawn; the
    other, multiprocessing's resource tracker, is not it)."""
    children = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True,
                              text=True).stdout.split()
    engines = [int(pid) for pid in children
               if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(engines) == 1, children
    return engines[0]


def start(tmp_path: Path) -> tuple["subprocess.Popen[bytes]", str]:
    port = free_port()
    argv = [sys.executable, "-m", "server", str(FIXTURE / "base"), "--adapter-dir",
            str(copy_adapters(tmp_path / "adapters")), "--port", str(port), "--dtype",
            "float32", "--device", "cpu", "--kv-cache-memory", "32MiB", "--engine-process"]
    env = os.environ | {"GOAT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url)
    return proc, url


def test_python_m_server_engine_process_serves_reports_and_stops(tmp_path: Path) -> None:
    proc, url = start(tmp_path)
    try:
        engine = engine_pid(proc.pid)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        chunks = list(client.completions.create(model="goat0", prompt=[5, 6, 7], max_tokens=4,
                                                stream=True,
                                                stream_options={"include_usage": True}))
        # Four tokens, however they are split into text: a token that ends inside a UTF-8
        # character sends its text with the next one (CI once saw 3 chunks with text).
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
        assert "".join(c.choices[0].text for c in chunks if c.choices)
        assert chunks[-2].choices[0].finish_reason == "length"
        samples, _ = parse_exposition(httpx.get(f"{url}/metrics").text)
        # the engine process's listener events (steps, loads), on the server's metrics
        assert samples[("goat_batch_size_count", frozenset())] >= 4
        assert samples[("goat_adapter_loads_total", frozenset({("adapter", "goat0")}))] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    output = proc.stdout.read().decode() if proc.stdout else ""
    # uvicorn re-raises the signal it stopped on, once it has stopped
    assert code == -signal.SIGTERM and "Application shutdown complete" in output, output
    assert "did not stop" not in output and not Path(f"/proc/{engine}").exists(), output


def test_a_dead_engine_process_stops_the_server_with_its_cause(tmp_path: Path) -> None:
    proc, _ = start(tmp_path)
    try:
        os.kill(engine_pid(proc.pid), signal.SIGKILL)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert code != 0 and "EngineProcessExited" in output and "exit code -9" in output, output
