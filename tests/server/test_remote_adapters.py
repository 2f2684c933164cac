"""A server whose adapter folder is an S3 prefix on a real S3 server (moto, tests/s3.py):
/v1/models lists the adapters without downloading them, concurrent requests for one adapter
download it once, lora_path takes URLs inside the allowed roots, and /metrics counts downloads,
bytes and failures."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from goat_runtime.adapters.format import CONFIG_FILE, WEIGHTS_FILE
from tests.s3 import BUCKET, s3_bucket, upload
from tests.server.conftest import FIXTURE, PROMPTS, LiveServer, greedy, start_real_server, token_ids
from tests.server.test_metrics import scrape, value

ADAPTERS = FIXTURE / "adapters"


@pytest.fixture(scope="module")
def live(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("remote")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fs = s3_bucket(s3_server, monkeypatch)
        for name in ("goat0", "goat1", "lora0"):
            upload(fs, ADAPTERS / name, f"team/{name}")
        server = start_real_server(tmp, adapter_dir=f"s3://{BUCKET}/team",
                                   adapter_cache_dir=tmp / "cache", max_loras=2)
        yield server
        server.stop()


def _cache(live: LiveServer) -> list[Path]:
    root = live.engine.config.adapter_cache_dir
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def complete(http: httpx.Client, model: str, i: int) -> list[int]:
    response = http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i],
                                                  "max_tokens": 12, "temperature": 0,
                                                  "ignore_eos": True})
    assert response.status_code == 200, response.text
    return token_ids(response.json()["choices"][0]["text"])


def _size(name: str) -> int:
    return sum((ADAPTERS / name / f).stat().st_size for f in (CONFIG_FILE, WEIGHTS_FILE))


@pytest.mark.slow
def test_remote_adapters_are_listed_downloaded_once_and_served(live: LiveServer) -> None:
    with live.http() as http:
        cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert {n: (cards[n]["loaded"], cards[n]["location"]) for n in ("goat0", "lora0")} == {
            "goat0": (False, "remote"), "lora0": (False, "remote")}
        assert _cache(live) == []  # listed, not downloaded
        with ThreadPoolExecutor(6) as pool:  # six requests wait for one download
            results = list(pool.map(lambda i: complete(http, "goat0", i % 3), range(6)))
        assert results == [greedy("goat0", i % 3) for i in range(6)]
        samples, _ = scrape(http)
        assert value(samples, "goat_adapter_downloads_total", store="s3") == 1
        assert value(samples, "goat_adapter_download_bytes_total", store="s3") == _size("goat0")
        assert _cache(live) == [CONFIG_FILE, WEIGHTS_FILE]
        card = http.get("/v1/models/goat0").json()
        assert card["loaded"] is True and card["kind"] == "goat"


def test_load_lora_adapter_from_a_url(live: LiveServer) -> None:
    with live.http() as http:
        def load(name: str, path: str) -> httpx.Response:
            return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})

        response = load("from-s3", f"s3://{BUCKET}/team/lora0")
        assert response.status_code == 200, response.text
        assert complete(http, "from-s3", 1) == greedy("lora0", 1)
        before, _ = scrape(http)
        for path, status in [(f"s3://{BUCKET}/team/missing", 404),
                             (f"s3://{BUCKET}/elsewhere/lora0", 400),  # outside the roots
                             ("s3://another-bucket/team/lora0", 400),
                             ("hf://org/repo", 400), ("gs://bucket/x", 400)]:
            response = load("nope", path)
            assert response.status_code == status, (path, response.text)
            assert response.json()["error"]["param"] == "lora_path"
        after, _ = scrape(http)
        failures = "goat_adapter_download_failures_total"
        assert value(after, failures, store="s3", reason="not_found") - value(
            before, failures, store="s3", reason="not_found") == 1
        assert http.post("/v1/unload_lora_adapter",
                         json={"lora_name": "from-s3"}).status_code == 200
