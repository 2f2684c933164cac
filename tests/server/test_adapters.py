"""Adapters by name: on-demand loading, vLLM's load/unload endpoints and their status codes,
path confinement (traversal, symlinks, allowed roots), pickle-only and corrupt adapters."""

import asyncio
import logging
import pickle
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from server.state import Settings
from tests.server.conftest import FIXTURE, PROMPTS, LiveServer, greedy, start_real_server, token_ids
from tests.server.test_http import assert_openai_error


@pytest.fixture(scope="module")
def extra_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extra-root")
    shutil.copytree(FIXTURE / "adapters" / "lora0", root / "lora-extra")
    return root


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, extra_root: Path) -> Iterator[LiveServer]:
    server = start_real_server(tmp_path_factory.mktemp("adapters"),
                               Settings(allowed_adapter_roots=(extra_root,)))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with live.http() as client:
        yield client


def models(http: httpx.Client) -> dict[str, dict]:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}


def complete(http: httpx.Client, model: str, i: int = 0) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[i],
                                              "max_tokens": 12, "temperature": 0,
                                              "ignore_eos": True})


@pytest.mark.slow
def test_request_loads_an_adapter_on_demand(http: httpx.Client) -> None:
    assert models(http)["goat1"]["loaded"] is False
    response = complete(http, "goat1", 1)
    assert token_ids(response.json()["choices"][0]["text"]) == greedy("goat1", 1)
    card = models(http)["goat1"]
    assert card["loaded"] is True and card["location"] in ("device", "host")


def test_load_and_unload(http: httpx.Client, live: LiveServer) -> None:
    response = http.post("/v1/load_lora_adapter",
                         json={"lora_name": "alias0", "lora_path": "goat0"})
    assert response.status_code == 200, response.text
    assert "alias0" in response.text
    assert models(http)["alias0"]["parent"] == "base"
    assert token_ids(complete(http, "alias0").json()["choices"][0]["text"]) == greedy("goat0", 0)
    absolute = str(live.adapter_dir / "lora0")
    assert_openai_error(http.post("/v1/load_lora_adapter",
                                  json={"lora_name": "alias0", "lora_path": absolute}), 400)
    response = http.post("/v1/unload_lora_adapter", json={"lora_name": "alias0"})
    assert response.status_code == 200, response.text
    assert "alias0" not in models(http)
    assert_openai_error(complete(http, "alias0"), 404, "model")
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "alias0"}), 404)
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "never"}), 404)
    # an absolute path inside the adapter dir is fine
    response = http.post("/v1/load_lora_adapter",
                         json={"lora_name": "alias1", "lora_path": absolute})
    assert response.status_code == 200, response.text
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "alias1"}).status_code == 200


@pytest.mark.parametrize("name", ["", "-lead", ".hidden", "a/b", "../x", "a b", "x" * 129,
                                  "ünï", "base"])
def test_bad_adapter_names(http: httpx.Client, name: str) -> None:
    for route, body in (("/v1/load_lora_adapter", {"lora_name": name, "lora_path": "goat0"}),
                        ("/v1/unload_lora_adapter", {"lora_name": name})):
        assert_openai_error(http.post(route, json=body), 400, "lora_name")


def test_load_body_errors(http: httpx.Client) -> None:
    assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "x"}), 400,
                        "lora_path")
    assert_openai_error(http.post("/v1/load_lora_adapter", content=b"{",
                                  headers={"Content-Type": "application/json"}), 400)
    assert_openai_error(http.post("/v1/load_lora_adapter",
                                  json={"lora_name": "x", "lora_path": "missing"}), 404,
                        "lora_path")


@pytest.mark.parametrize(("path", "reason"), [
    ("x" * 300, "File name too long"),  # one component over NAME_MAX (255)
    ("goat0/" + "a/" * 2100, "File name too long"),  # the whole path over PATH_MAX (4096)
    ("loop", "Too many levels of symbolic links"),
    ("loop/inner", "Too many levels of symbolic links"),
])
def test_unusable_paths_are_400_naming_the_problem(http: httpx.Client, live: LiveServer,
                                                   path: str, reason: str) -> None:
    loop = live.adapter_dir / "loop"
    loop.symlink_to(loop)
    try:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": path})
    finally:
        loop.unlink()
    error = assert_openai_error(response, 400, "lora_path")
    assert reason in error["message"] and error["code"] == "invalid_path"
    assert str(live.adapter_dir) not in error["message"]
    assert "x" not in models(http)


def test_paths_are_confined_after_symlinks(http: httpx.Client, live: LiveServer,
                                           tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(FIXTURE / "adapters" / "goat0", outside)
    escape = live.adapter_dir / "escape-link"
    escape.symlink_to(outside, target_is_directory=True)
    try:
        attempts = ["../outside", str(outside), "escape-link", str(escape),
                    f"goat0/../../{tmp_path.name}/outside", "/etc", "/", "..", "goat0\x00x",
                    str(live.adapter_dir / ".." / ".." / tmp_path.name / "outside")]
        for path in attempts:
            response = http.post("/v1/load_lora_adapter",
                                 json={"lora_name": "sneaky", "lora_path": path})
            error = assert_openai_error(response, 400, "lora_path")
            assert str(outside) not in error["message"]
        assert "sneaky" not in models(http)
    finally:
        escape.unlink()


def test_allowed_root(http: httpx.Client, extra_root: Path) -> None:
    response = http.post("/v1/load_lora_adapter", json={
        "lora_name": "extra", "lora_path": str(extra_root / "lora-extra")})
    assert response.status_code == 200, response.text
    assert token_ids(complete(http, "extra", 2).json()["choices"][0]["text"]) == greedy(
        "lora0", 2)
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "extra"}).status_code == 200


class _Trap:
    """Unpickling this creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_only_adapter_is_never_unpickled(http: httpx.Client, live: LiveServer,
                                                tmp_path: Path) -> None:
    folder = live.adapter_dir / "pickled"
    folder.mkdir()
    shutil.copy(FIXTURE / "adapters" / "lora0" / "adapter_config.json", folder)
    marker = tmp_path / "unpickled"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    try:
        error = assert_openai_error(complete(http, "pickled"), 400)
        assert "safetensors" in error["message"]
        assert str(live.adapter_dir) not in error["message"]  # no server paths
        error = assert_openai_error(http.post("/v1/load_lora_adapter", json={
            "lora_name": "pickled2", "lora_path": "pickled"}), 400, "lora_path")
        assert "safetensors" in error["message"]
        assert not marker.exists()
    finally:
        shutil.rmtree(folder)


def test_corrupt_adapter_while_others_keep_succeeding(live: LiveServer) -> None:
    folder = live.adapter_dir / "broken"
    folder.mkdir()
    shutil.copy(FIXTURE / "adapters" / "goat0" / "adapter_config.json", folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00"
                                                       b"{\"not\": a safetensors header")

    async def scenario() -> None:
        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0)

        async def good(model: str, i: int) -> None:
            stream = await client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=12, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            text = "".join([c.choices[0].text async for c in stream])
            assert token_ids(text) == greedy(model, i)

        async def bad() -> None:
            with pytest.raises(openai.BadRequestError) as info:
                await client.completions.create(model="broken", prompt=PROMPTS[0],
                                                max_tokens=4)
            assert "broken" in info.value.message or "safetensors" in info.value.message

        await asyncio.gather(good("goat0", 0), bad(), good("lora0", 1), bad(),
                             good("base", 2), good("goat1", 0))
        await client.close()

    try:
        asyncio.run(scenario())
        with live.http() as http:
            assert_openai_error(http.post("/v1/load_lora_adapter", json={
                "lora_name": "broken2", "lora_path": "broken"}), 400, "lora_path")
            assert complete(http, "goat0").status_code == 200
    finally:
        shutil.rmtree(folder)


def test_unloads_racing_requests_answer_200_or_404(http: httpx.Client, caplog) -> None:
    """An adapter loaded and unloaded in a loop while requests for it keep arriving: each
    request gets its exact tokens or a 404, each unload succeeds, and the server logs nothing."""
    statuses: list[int] = []

    def ask() -> None:
        response = complete(http, "racer", 1)
        statuses.append(response.status_code)
        if response.status_code == 200:
            assert token_ids(response.json()["choices"][0]["text"]) == greedy("lora0", 1)
        else:
            assert_openai_error(response, 404, "model")

    with caplog.at_level("WARNING"), ThreadPoolExecutor(6) as pool:
        for _ in range(5):
            response = http.post("/v1/load_lora_adapter",
                                 json={"lora_name": "racer", "lora_path": "lora0"})
            assert response.status_code == 200, response.text
            asked = [pool.submit(ask) for _ in range(6)]
            time.sleep(0.05)
            response = http.post("/v1/unload_lora_adapter", json={"lora_name": "racer"})
            assert response.status_code == 200, response.text
            for future in asked:
                future.result()
    assert 200 in statuses and set(statuses) <= {200, 404}
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert "racer" not in models(http)
