"""Faults over HTTP: a fault for one adapter answers that request an OpenAI-shaped 500 naming
the cause while a concurrent request of another adapter gets its exact tokens and /health stays
200; a dead engine makes /health answer 503 naming the cause, and `python -m server` exit
non-zero (tests/server/dying_server.py injects that fault into a real process)."""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import goat_runtime.model.layers as layers
from tests.server.conftest import (
    BASE,
    FIXTURE,
    PROMPTS,
    greedy,
    start_real_server,
    token_ids,
    wait_healthy,
)
from tests.server.test_cli import REPO, _free_port
from tests.server.test_http import assert_openai_error


def completion(model: str, i: int, max_tokens: int = 12) -> dict:
    return {"model": model, "prompt": PROMPTS[i], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}


def test_a_fault_for_one_adapter_answers_500_to_its_request_alone(tmp_path, monkeypatch):
    live = start_real_server(tmp_path)
    try:
        adapters = live.engine.engine.adapters
        op = layers.add_routed_lora

        def faulty_op(y, x, slots, weights, counts=None):
            if any(adapters.slot_owner(s) == "lora0" for s in slots.unique().tolist()):
                raise RuntimeError("injected kernel fault")
            return op(y, x, slots, weights, counts)

        monkeypatch.setattr(layers, "add_routed_lora", faulty_op)
        with live.http() as http, ThreadPoolExecutor(4) as pool:
            # goat0 runs long enough to share steps with both lora0 requests.
            good = pool.submit(http.post, "/v1/completions", json=completion("goat0", 2, 40))
            time.sleep(0.2)
            bad = pool.submit(http.post, "/v1/completions", json=completion("lora0", 1))
            stream = pool.submit(http.post, "/v1/completions",
                                 json=completion("lora0", 0) | {"stream": True})
            error = assert_openai_error(bad.result(), 500)
            assert error["type"] == "server_error"
            assert "RuntimeError: injected kernel fault" in error["message"]
            # Failed before its first token: an HTTP error too, not an event stream.
            assert "injected kernel fault" in assert_openai_error(stream.result(), 500)["message"]
            response = good.result()
            assert response.status_code == 200, response.text
            text = response.json()["choices"][0]["text"]
            assert token_ids(text)[:12] == greedy("goat0", 2) and len(token_ids(text)) == 40
            assert http.get("/health").status_code == 200
        assert live.engine.engine.allocator.num_free == live.engine.engine.num_blocks
    finally:
        live.stop()


def test_a_dead_engine_answers_503_on_health_naming_the_cause(tmp_path, monkeypatch):
    live = start_real_server(tmp_path)
    try:
        def broken(input_ids, positions):
            raise RuntimeError("injected: device lost")

        monkeypatch.setattr(live.engine.engine.model, "forward", broken)
        with live.http() as http:
            assert http.get("/health").status_code == 200
            error = assert_openai_error(http.post("/v1/completions",
                                                  json=completion(BASE, 0)), 500)
            assert "device lost" in error["message"]
            deadline = time.monotonic() + 10
            while http.get("/health").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            health = assert_openai_error(http.get("/health"), 503)
            assert health["code"] == "engine_dead"
            assert "The engine failed: EngineDeadError: RuntimeError: injected: device lost" in (
                health["message"])
            assert_openai_error(http.post("/v1/completions", json=completion(BASE, 0)), 503)
    finally:
        live.stop()


@pytest.mark.slow
def test_the_server_process_exits_non_zero_when_its_engine_dies(tmp_path: Path) -> None:
    port = _free_port()
    env = os.environ | {"GOAT_CACHE_DIR": str(tmp_path / "cache"),
                        "PYTHONPATH": os.pathsep.join(filter(None, [
                            str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.server.dying_server", str(FIXTURE / "base"), "--port",
         str(port), "--dtype", "float32", "--device", "cpu", "--kv-cache-memory", "8MiB",
         "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        response = httpx.post(f"{url}/v1/completions", json=completion(BASE, 0), timeout=30)
        error = assert_openai_error(response, 500)
        assert "device lost" in error["message"]
        proc.wait(timeout=30)
        output = proc.stdout.read().decode()
        assert proc.returncode == 1, output
        assert "the engine failed (EngineDeadError" in output and "supervisor" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

