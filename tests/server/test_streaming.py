"""Concurrency and request lifecycles: concurrent streams over different adapters, client
disconnects aborting their requests, the queue limit, and errors in the middle of a stream."""

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from server.state import Settings
from tests.server.conftest import (
    ADAPTERS,
    BASE,
    PROMPTS,
    FakeEngine,
    LiveServer,
    greedy,
    start_real_server,
    token_ids,
)
from tests.server.test_http import assert_openai_error


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_concurrent_streams_each_get_their_adapters_output(server: LiveServer) -> None:
    async def one(client: openai.AsyncOpenAI, model: str, i: int, chat: bool) -> None:
        if chat:  # same prompt ids through the chat route: a single 'user' message
            stream = await client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=12, temperature=0, stream=True,
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
        else:
            stream = await client.completions.create(
                model=model, prompt=PROMPTS[i], max_tokens=12, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert token_ids(text) == greedy(model, i), (model, i)
        assert {c.model for c in chunks} == {model}

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x",
                                      max_retries=0) as client:
            await asyncio.gather(*(one(client, model, i, (i + j) % 2 == 0)
                                   for j, model in enumerate([BASE, *ADAPTERS])
                                   for i in range(3)))

    asyncio.run(main())


def _abort_count(live: LiveServer) -> float:
    sample = live.app.state.server.metrics.requests.labels("goat0", "abort")
    return sample._value.get()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(server: LiveServer, stream: bool) -> None:
    metrics = server.app.state.server.metrics
    complete = server.http().post("/v1/completions", json={
        "model": "goat0", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0})
    assert complete.status_code == 200  # goat0 is loaded, so its label exists
    before = _abort_count(server)
    body = {"model": "goat0", "prompt": PROMPTS[0], "max_tokens": 500, "ignore_eos": True,
            "n": 4, "stream": stream}  # seconds of work: still running at the hang-up
    with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.5)) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # generation is running; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body)
    wait_for(lambda: metrics.in_flight_seqs() == 0 and not server.engine.engine.has_work())
    wait_for(lambda: _abort_count(server) == before + 1)


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One running sequence at most, one more may wait."""
    live = start_real_server(tmp_path_factory.mktemp("tight"),
                             Settings(max_queued_requests=1), max_num_seqs=1)
    yield live
    live.stop()


def test_queue_limit_answers_429_with_retry_after(tight_server: LiveServer) -> None:
    metrics = tight_server.app.state.server.metrics
    long_body = {"model": BASE, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True,
                 "stream": True}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=tight_server.url, timeout=60) as http:
            async def hold(started: asyncio.Event, release: asyncio.Event) -> None:
                async with http.stream("POST", "/v1/completions", json=long_body) as r:
                    assert r.status_code == 200
                    started.set()
                    await release.wait()

            release = asyncio.Event()
            first, second = asyncio.Event(), asyncio.Event()
            running = asyncio.create_task(hold(first, release))
            await first.wait()
            waiting = asyncio.create_task(hold(second, release))
            deadline = time.monotonic() + 10
            while metrics.in_flight_seqs() < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            response = await http.post("/v1/completions", json=long_body | {"stream": False})
            assert_openai_error(response, 429)
            assert response.headers["retry-after"] == "1"
            client = openai.AsyncOpenAI(base_url=f"{tight_server.url}/v1", api_key="x",
                                        max_retries=0)
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(
                    model=BASE, messages=[{"role": "user", "content": "w5"}], max_tokens=2)
            await client.close()
            release.set()
            running.cancel()
            waiting.cancel()
            await asyncio.gather(running, waiting, return_exceptions=True)

    asyncio.run(main())
    wait_for(lambda: metrics.in_flight_seqs() == 0)
    rejected = metrics.requests.labels(BASE, "rejected")._value.get()
    assert rejected == 2
    with tight_server.http() as http:  # and the server still serves
        ok = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPTS[0],
                                                "max_tokens": 3, "temperature": 0})
        assert ok.status_code == 200


def _events(response: httpx.Response) -> list[str]:
    return [e[len("data: "):] for e in response.read().decode().split("\n\n") if e]


def test_error_in_the_middle_of_a_stream(fake_server) -> None:
    live: LiveServer = fake_server(steps=5, fail_after=2)
    with live.http() as http:
        for route, body in (("/v1/completions", {"prompt": "w5"}),
                            ("/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "w5"}]})):
            with http.stream("POST", route, json={"model": "goat0", "stream": True} | body) as r:
                assert r.status_code == 200
                events = _events(r)
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])
            assert error["error"]["message"] == "the GPU caught fire"
            assert error["error"]["type"] == "server_error"
            assert all("error" not in json.loads(e) for e in events[:-2])
            assert len(events) >= 4
    stream = live.client().completions.create(model="goat0", prompt="w5", stream=True)
    with pytest.raises(openai.APIError, match="caught fire"):
        list(stream)


def test_internal_errors_are_500_with_a_request_id(fake_server,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    live: LiveServer = fake_server(fail_after=0, fault=RuntimeError("secret detail"))
    with caplog.at_level(logging.ERROR, logger="server"), live.http() as http:
        response = http.post("/v1/completions", json={"model": "goat0", "prompt": "w5"},
                             headers={"X-Request-Id": "req-42"})
        error = assert_openai_error(response, 500)
        assert "req-42" in error["message"] and "secret" not in response.text
        with http.stream("POST", "/v1/completions", json={
                "model": "goat0", "prompt": "w5", "stream": True}) as r:
            assert r.status_code == 500  # it fails before the first output: a plain 500
    assert any("req-42" in record.getMessage() for record in caplog.records)


def test_mid_stream_internal_error_hides_details(fake_server) -> None:
    live: LiveServer = fake_server(steps=4, fail_after=1, fault=KeyError("secret detail"))
    with live.http() as http, http.stream("POST", "/v1/completions", json={
            "model": "goat0", "prompt": "w5", "stream": True},
            headers={"X-Request-Id": "req-7"}) as r:
        events = _events(r)
    error = json.loads(events[-2])["error"]
    assert "req-7" in error["message"] and "secret" not in error["message"]


def test_aborted_by_shutdown_is_503(fake_server) -> None:
    """An engine that ends a request with finish_reason 'abort' (its shutdown timeout ran out)
    gives a 503 rather than a truncated success."""
    live: LiveServer = fake_server()
    engine: FakeEngine = live.engine
    original = engine.generate

    async def aborting(*args, **kwargs):
        async for out in original(*args, **kwargs):
            for delta in out.outputs:
                delta.finish_reason = "abort" if out.finished else None
            yield out

    engine.generate = aborting
    with live.http() as http:
        response = http.post("/v1/completions", json={"model": "goat0", "prompt": "w5"})
        assert_openai_error(response, 503)
        assert response.headers["retry-after"]
