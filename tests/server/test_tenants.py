"""Tenant keys on a real server: every route with every kind of key (admin, restricted, none,
wrong), isolation (a model outside a key's list answers exactly as one that does not exist, in
status, body and time), admin-only adapter routes, the key file reloaded over HTTP, the key id in
the access log and in the per-key metrics."""

import hashlib
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.state import Settings
from tests.server.conftest import (
    BASE,
    FIXTURE,
    PROMPTS,
    LiveServer,
    copy_adapters,
    start_real_server,
    wait_healthy,
)
from tests.server.exposition import parse_exposition
from tests.server.test_auth import routes
from tests.server.test_http import assert_openai_error
from tests.server.test_key_file import REPO, free_port

SECRETS = {"admin": "admin-secret", "acme": "acme-secret", "globex": "globex-secret"}
MODELS = {"admin": ["*"], "acme": [BASE, "goat0", "acme-*"], "globex": ["goat1", "lora*"]}


def key_file(ids: list[str]) -> str:
    lines = ["keys:"]
    for key_id in ids:
        sha = hashlib.sha256(SECRETS[key_id].encode()).hexdigest()
        lines += [f"  - id: {key_id}", f"    sha256: {sha}", f"    models: {MODELS[key_id]}",
                  f"    admin: {'true' if key_id == 'admin' else 'false'}"]
    return "\n".join(lines) + "\n"


def auth(key_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[key_id]}"}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("tenants")
    path = tmp / "keys.yaml"
    path.write_text(key_file(["admin", "acme", "globex"]))
    server = start_real_server(tmp, Settings(api_keys_file=path))
    yield server
    server.stop()


# What each route is, so that a route added later fails test_every_route_is_classified until
# it is given a body here (and so gets the checks below).
MODEL_ROUTES: dict[tuple[str, str], Callable[[str], dict[str, Any]]] = {
    ("POST", "/v1/completions"): lambda m: {"model": m, "prompt": PROMPTS[0], "max_tokens": 2},
    ("POST", "/v1/chat/completions"): lambda m: {
        "model": m, "max_tokens": 2, "messages": [{"role": "user", "content": "w5 w6"}]},
    ("GET", "/v1/models/{model_id}"): lambda m: {},
    ("POST", "/tokenize"): lambda m: {"model": m, "prompt": "w5 w6"},
    ("POST", "/detokenize"): lambda m: {"model": m, "tokens": [5, 6]},
}
ADMIN_ROUTES = {("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
                ("POST", "/v1/admin/reload_keys")}
OPEN_ROUTES = {("GET", "/health")}  # every key, and none
KEYED_ROUTES = {("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/docs"),
                ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}  # any valid key
ADMIN_ONLY_WITH_KEY_FILE = {("GET", "/metrics")}


def call(http: httpx.Client, method: str, path: str, key: str | None, model: str = "goat0",
         body: dict[str, Any] | None = None) -> httpx.Response:
    headers = auth(key) if key in SECRETS else ({"Authorization": "Bearer wrong"} if key else {})
    builder = MODEL_ROUTES.get((method, path))
    if body is None:
        body = builder(model) if builder else {}
    return http.request(method, path.replace("{model_id}", model), headers=headers, json=body)


def route_table(live: LiveServer) -> set[tuple[str, str]]:
    return {(m, p.replace("goat0", "{model_id}")) for m, p in routes(live)}


def test_every_route_is_classified(live: LiveServer) -> None:
    known = (set(MODEL_ROUTES) | ADMIN_ROUTES | OPEN_ROUTES | KEYED_ROUTES
             | ADMIN_ONLY_WITH_KEY_FILE)
    assert route_table(live) == known


def test_every_route_with_every_kind_of_key(live: LiveServer) -> None:
    with live.http() as http:
        for method, path in sorted(route_table(live)):
            for key in (None, "wrong"):  # no key, a wrong key
                response = call(http, method, path, key)
                if (method, path) in OPEN_ROUTES:
                    assert response.status_code == 200
                else:
                    assert assert_openai_error(response, 401)["code"] == "invalid_api_key"
            restricted = call(http, method, path, "acme")
            admin = call(http, method, path, "admin")
            if (method, path) in ADMIN_ROUTES | ADMIN_ONLY_WITH_KEY_FILE:
                error = assert_openai_error(restricted, 403)
                assert error["code"] == "permission_denied" and error["type"] == (
                    "permission_error")
                assert admin.status_code not in (401, 403) and admin.status_code < 500, (
                    method, path, admin.text)
                continue
            assert restricted.status_code == 200, (method, path, restricted.text)
            assert admin.status_code == 200, (method, path, admin.text)
            if (method, path) in MODEL_ROUTES:
                # Someone else's adapter: as if it did not exist; the admin key sees it.
                assert_same_as_nobodys(http, method, path, "acme", "goat1", "nobody1")
                assert call(http, method, path, "admin", "goat1").status_code == 200
                assert call(http, method, path, "globex", "goat1").status_code == 200
                assert_openai_error(call(http, method, path, "globex", "goat0"), 404, "model")


def normalized(response: httpx.Response, name: str) -> tuple[int, str]:
    """Status and body, with the model name (echoed in the message) replaced."""
    return response.status_code, response.text.replace(f"'{name}'", "'<name>'")


def assert_same_as_nobodys(http: httpx.Client, method: str, path: str, key: str, someone: str,
                           nobody: str) -> None:
    theirs, nobodys = call(http, method, path, key, someone), call(http, method, path, key,
                                                                  nobody)
    assert_openai_error(theirs, 404, "model")
    assert normalized(theirs, someone) == normalized(nobodys, nobody)
    assert theirs.headers.keys() == nobodys.headers.keys()


def test_model_list_shows_only_the_keys_models(live: LiveServer) -> None:
    with live.http() as http:
        seen = {key: sorted(m["id"] for m in http.get("/v1/models", headers=auth(key))
                            .json()["data"]) for key in SECRETS}
    assert seen["acme"] == sorted([BASE, "goat0"])
    assert seen["globex"] == ["goat1", "lora0"]
    assert seen["admin"] == sorted([BASE, "goat0", "goat1", "lora0"])


def test_name_guessing_sweep(live: LiveServer) -> None:
    """Someone else's adapters and nobody's answer alike, also in time: a loop of 200 tries of
    each, interleaved; the medians must agree within a generous factor (the code path is the
    same by construction: names outside the key's list never reach the engine)."""
    theirs_names = ["goat1", "lora0"]
    with live.http() as http:
        for method, path in (("GET", "/v1/models/{model_id}"), ("POST", "/v1/completions"),
                             ("POST", "/v1/chat/completions")):
            for name in theirs_names:
                assert_same_as_nobodys(http, method, path, "acme", name, f"zz{name}")
        times: dict[str, list[float]] = {"theirs": [], "nobodys": []}
        for i in range(200):
            for kind, name in (("theirs", theirs_names[i % 2]), ("nobodys", f"nobody{i}")):
                start = time.perf_counter()
                response = call(http, "POST", "/v1/completions", "acme", name)
                times[kind].append(time.perf_counter() - start)
                assert response.status_code == 404
    ratio = statistics.median(times["theirs"]) / statistics.median(times["nobodys"])
    assert 1 / 1.5 < ratio < 1.5, ratio


def test_adapters_load_and_unload_need_admin(live: LiveServer) -> None:
    assert live.adapter_dir is not None
    load = {"lora_name": "acme-extra", "lora_path": str(live.adapter_dir / "goat0")}
    with live.http() as http:
        for key in ("acme", "globex"):
            for path, body in (("/v1/load_lora_adapter", load),
                               ("/v1/unload_lora_adapter", {"lora_name": "goat0"})):
                assert_openai_error(http.post(path, json=body, headers=auth(key)), 403)
        # Trailing-slash and case variants do not slip past the admin check.
        response = http.post("/v1/load_lora_adapter/", json=load, headers=auth("acme"))
        assert response.status_code in (403, 404, 405, 307)
        assert http.post("/v1/load_lora_adapter", json=load, headers=auth("admin")).is_success
        try:
            listed = [m["id"] for m in http.get("/v1/models", headers=auth("acme")).json()["data"]]
            assert "acme-extra" in listed  # acme-* is acme's
            out = http.post("/v1/completions", headers=auth("acme"), json={
                "model": "acme-extra", "prompt": PROMPTS[0], "max_tokens": 2})
            assert out.status_code == 200
            assert_same_as_nobodys(http, "POST", "/v1/completions", "globex", "acme-extra",
                                   "acme-nothing")
        finally:
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": "acme-extra"},
                             headers=auth("admin")).is_success


def metric(text: str, name: str, **labels: str) -> float | None:
    samples, _ = parse_exposition(text)
    return samples.get((name, frozenset(labels.items())))


def test_reload_over_http_access_log_and_key_metrics(live: LiveServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = live.app.state.server.settings.api_keys_file
    assert isinstance(path, Path)
    caplog.set_level(logging.INFO, logger="server.access")
    with live.http() as http:
        scraped = http.get("/metrics", headers=auth("admin")).text
        before = metric(scraped, "goat_key_requests_total", key="globex", outcome="success")
        assert before is not None  # series of every key exist from the start
        assert metric(scraped, "goat_key_rate_limited_total", key="acme", limit="tokens") == 0
        response = call(http, "POST", "/v1/completions", "globex", "goat1")
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        scraped = http.get("/metrics", headers=auth("admin")).text
        assert metric(scraped, "goat_key_requests_total", key="globex",
                      outcome="success") == before + 1
        assert metric(scraped, "goat_key_tokens_total", key="globex", kind="generation") >= 2
        assert metric(scraped, "goat_key_queue_time_seconds_count", key="globex") >= 1
        wrong = call(http, "GET", "/v1/models", "wrong")
        keys_seen = {dict(labels).get("key") for (name, labels) in
                     parse_exposition(http.get("/metrics", headers=auth("admin")).text)[0]
                     if name.startswith("goat_key_")}
        assert keys_seen == set(SECRETS)  # bounded by the key file; wrong keys mint nothing
        line = next(r.getMessage() for r in caplog.records if request_id in r.getMessage())
        assert "key=globex" in line and '"POST /v1/completions" 200' in line
        assert "globex-secret" not in caplog.text
        assert any(f"request_id={wrong.headers['x-request-id']}" in r.getMessage()
                   and "key=- " in r.getMessage() and " 401 " in r.getMessage()
                   for r in caplog.records)

        good = path.read_text()
        try:
            path.write_text(good + "  - id: broken\n    sha256: nope\n    models: [x]\n")
            error = assert_openai_error(http.post("/v1/admin/reload_keys",
                                                  headers=auth("admin")), 400)
            assert "line 14" in error["message"] and error["code"] == "invalid_key_file"
            assert call(http, "GET", "/v1/models", "globex").status_code == 200  # still in force

            path.write_text(key_file(["admin", "acme"]))  # globex removed
            reloaded = http.post("/v1/admin/reload_keys", headers=auth("admin"))
            assert reloaded.status_code == 200 and reloaded.json()["ids"] == ["admin", "acme"]
            assert_openai_error(call(http, "GET", "/v1/models", "globex"), 401)
            scraped = http.get("/metrics", headers=auth("admin")).text
            assert metric(scraped, "goat_key_requests_total", key="globex",
                          outcome="success") is None  # its series are gone
        finally:
            path.write_text(good)
            assert http.post("/v1/admin/reload_keys", headers=auth("admin")).status_code == 200
        assert call(http, "GET", "/v1/models", "globex").status_code == 200


def _wait_for(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_python_m_server_with_a_key_file_reloads_on_sighup(tmp_path: Path) -> None:
    """A real process: a bad key file stops start-up with its line; a good one serves, logs each
    request's key id; SIGHUP re-reads the file, refusing a bad one (the old keys stay)."""
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - id: acme\n    models: [x]\n")
    port = free_port()
    adapter_dir = copy_adapters(tmp_path / "adapters")
    argv = [sys.executable, "-m", "server", str(FIXTURE / "base"), "--adapter-dir",
            str(adapter_dir), "--port", str(port), "--dtype", "float32", "--device", "cpu",
            "--kv-cache-memory", "32MiB", "--api-keys-file", str(keys)]
    env = os.environ | {"GOAT_CACHE_DIR": str(tmp_path / "cache")}
    bad = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "line 2: key 'acme': 'sha256'" in bad.stderr, bad.stderr
    keys.write_text(key_file(["admin", "acme"]))
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        with httpx.Client(base_url=url, timeout=30) as http:
            def status(key: str) -> int:
                return http.get("/v1/models", headers=auth(key)).status_code

            assert status("acme") == 200 and status("globex") == 401
            _wait_for(lambda: "key=acme" in log.read_text())
            assert "acme-secret" not in log.read_text()
            keys.write_text("keys:\n  - id: [\n")
            proc.send_signal(signal.SIGHUP)
            _wait_for(lambda: "key file refused" in log.read_text())
            assert "line 3, column 1" in log.read_text() and status("acme") == 200
            keys.write_text(key_file(["admin", "globex"]))
            proc.send_signal(signal.SIGHUP)
            _wait_for(lambda: status("globex") == 200)
            assert status("acme") == 401
    finally:
        proc.terminate()
        proc.wait(30)
