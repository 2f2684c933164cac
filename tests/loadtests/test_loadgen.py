"""The load generator against a fake OpenAI-compatible streaming server, and its statistics.

The fake server's behaviour is chosen by the request's `model`, so one run can mix successes
with each failure kind: `ok-*` streams max_tokens tokens with usage, `nousage-*` omits usage,
`fail-500` answers HTTP 500, `fail-mid` sends an error event mid-stream, `nodone` ends without
[DONE], `hang` waits long before the first token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loadtests.loadgen import (
    LoadConfig,
    check_loopback,
    endpoint_url,
    main,
    run_load,
)
from loadtests.report import RequestRecord, percentile, summarize
from loadtests.stream import send_request
from loadtests.workload import AdapterChooser, LengthDist, Workload, arrival_offsets

TOKEN_DELAY_S = 0.003


def _fake_chunk(model: str, text: str, chat: bool) -> str:
    if chat:
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": None}
    return "data: " + json.dumps({"model": model, "choices": [choice]}) + "\n\n"


async def _fake_events(body: dict, chat: bool) -> AsyncIterator[str]:
    """The fake server's stream for one request, as its `model` chooses (module docstring)."""
    model = body["model"]
    n = int(body.get("max_tokens") or 4)
    if chat:  # like vLLM: a first chunk with the role and no content
        yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "x"}}]})
        yield "\n\n"
    if model == "hang":
        await asyncio.sleep(30)
    for i in range(n):
        await asyncio.sleep(TOKEN_DELAY_S)
        yield _fake_chunk(model, f" t{i}", chat)
        if model == "fail-mid" and i == 1:
            yield 'data: {"error": {"message": "engine died", "code": 500}}\n\n'
            yield "data: [DONE]\n\n"
            return
    if not model.startswith("nousage"):
        usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
        yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
    if model != "nodone":
        yield "data: [DONE]\n\n"


def _fake_app() -> FastAPI:
    app = FastAPI()
    app.state.bodies = []

    async def handle(request: Request, chat: bool):
        body = await request.json()
        app.state.bodies.append(body)
        if body["model"] == "fail-500":
            return JSONResponse({"error": {"message": "boom", "code": 500}}, status_code=500)
        return StreamingResponse(_fake_events(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FastAPI]]:
    """The fake server on a real socket (127.0.0.1, an OS-chosen port) in a background thread."""
    app = _fake_app()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def _config(url: str, **kw) -> LoadConfig:
    defaults = dict(
        models=["ok-a"],
        url=url,
        output_len=LengthDist("fixed", 5),
        prompt_len=LengthDist("fixed", 8),
        drain_timeout_s=5.0,
        request_timeout_s=10.0,
    )
    return LoadConfig(**{**defaults, **kw})


# --- statistics -----------------------------------------------------------------------------


def test_percentile_on_known_data() -> None:
    data = list(range(1, 102))  # 1..101: the q-th percentile is exactly q + 1
    assert [percentile(data, q) for q in (0, 50, 90, 99, 100)] == [1, 51, 91, 100, 101]
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5  # interpolated, input order irrelevant
    assert percentile([1.0, 2.0], 90) == pytest.approx(1.9)
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_summarize_known_records() -> None:
    fast = RequestRecord(0, "a", 8, 5, start_s=0.0, ttft_s=0.1, e2e_s=0.5, output_tokens=5)
    fast.itl_s = [0.1, 0.1, 0.1, 0.1]
    slow = RequestRecord(1, "b", 8, 5, start_s=0.5, ttft_s=0.3, e2e_s=1.5, output_tokens=5)
    slow.itl_s = [0.3, 0.3, 0.3, 0.3]
    one = RequestRecord(2, "a", 8, 1, start_s=1.0, ttft_s=0.2, e2e_s=0.2, output_tokens=1)
    bad = RequestRecord(3, "b", 8, 5, error_kind="http_500", error="boom", status=500)
    cut = RequestRecord(4, "b", 8, 5, ttft_s=0.1, error_kind="stream_error", error="died")

    s = summarize([fast, slow, one, bad, cut], elapsed_s=2.0, slo_ttft_ms=250, slo_tpot_ms=200)
    assert (s.num_requests, s.num_ok, s.num_errors) == (5, 3, 2)
    assert s.errors_by_kind == {"http_500": 1, "stream_error": 1}
    assert s.error_examples == {"http_500": "boom", "stream_error": "died"}
    assert s.requests_by_adapter == {"a": 2, "b": 3}
    assert s.request_throughput == pytest.approx(1.5)
    assert s.output_token_throughput == pytest.approx(11 / 2)
    assert fast.tpot_s == pytest.approx(0.1) and slow.tpot_s == pytest.approx(0.3)
    assert one.tpot_s is None  # no second token
    assert s.tpot_ms.count == 2 and s.tpot_ms.mean == pytest.approx(200)
    assert s.ttft_ms.percentiles["p50"] == pytest.approx(200)
    assert s.itl_ms.count == 8 and s.itl_ms.percentiles["p50"] == pytest.approx(200)
    assert s.e2e_ms.max == pytest.approx(1500)
    # `fast` and `one` (no TPOT to miss) meet the SLOs; `slow` misses both.
    assert s.num_good == 2 and s.goodput == pytest.approx(1.0)
    assert summarize([fast], 1.0).goodput is None  # no SLO, no goodput


# --- workload -------------------------------------------------------------------------------


def test_round_robin_is_exact_order() -> None:
    chooser = AdapterChooser(["a", "b", "c"], "round-robin", random.Random(0))
    assert [chooser.choose() for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]


def test_zipf_prefers_the_first_adapter() -> None:
    models = [f"m{i}" for i in range(8)]
    chooser = AdapterChooser(models, "zipf", random.Random(1), zipf_alpha=1.0)
    n = 20_000
    counts = Counter(chooser.choose() for _ in range(n))
    assert counts.most_common(1)[0][0] == "m0"
    probs = chooser.probabilities()
    harmonic = sum(1 / k for k in range(1, 9))
    assert probs[0] == pytest.approx(1 / harmonic) and probs[7] == pytest.approx(1 / 8 / harmonic)
    for model, p in zip(models, probs, strict=True):
        assert counts[model] / n == pytest.approx(p, abs=0.015)
    assert counts["m0"] > counts["m1"] > counts["m3"] > counts["m7"]


def test_uniform_choice_is_roughly_even() -> None:
    chooser = AdapterChooser(["a", "b", "c", "d"], "uniform", random.Random(2))
    counts = Counter(chooser.choose() for _ in range(20_000))
    assert set(counts) == {"a", "b", "c", "d"}
    assert all(abs(c / 20_000 - 0.25) < 0.015 for c in counts.values())


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrival_offsets_have_the_rate_and_shape(burstiness: float) -> None:
    rate, n = 50.0, 40_000
    offsets = arrival_offsets(rate, burstiness, random.Random(3))
    times = [next(offsets) for _ in range(n + 1)]
    assert times[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0
    assert n / times[-1] == pytest.approx(rate, rel=0.03)
    # gamma(shape k): coefficient of variation 1/sqrt(k); 1 for a Poisson process
    cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)


def test_infinite_rate_sends_at_once_and_bad_rates_fail() -> None:
    offsets = arrival_offsets(math.inf, 1.0, random.Random(0))
    assert [next(offsets) for _ in range(5)] == [0.0] * 5
    with pytest.raises(ValueError, match="rate"):
        next(arrival_offsets(0.0, 1.0, random.Random(0)))
    with pytest.raises(ValueError, match="burstiness"):
        next(arrival_offsets(1.0, 0.0, random.Random(0)))


def test_length_distributions() -> None:
    rng = random.Random(4)
    assert LengthDist.parse("12").sample(rng) == 12
    assert {LengthDist.parse("uniform:3:5").sample(rng) for _ in range(200)} == {3, 4, 5}
    normal = LengthDist.parse("normal:10:20:4")
    draws = [normal.sample(rng) for _ in range(2000)]
    assert min(draws) == 4 and max(draws) > 30  # clamped below, free above
    assert str(normal) == "normal:10:20:4"
    for bad in ("", "uniform:9:3", "normal:1", "poisson:3", "fixed:0", "1:2"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_workload_is_reproducible_from_the_seed() -> None:
    def draw(seed: int) -> list[tuple[str, int, int, str]]:
        w = Workload(
            ["a", "b"], "uniform", LengthDist("uniform", 2, 9), LengthDist("fixed", 3), seed
        )
        return [
            (s.adapter, s.prompt_words, s.max_tokens, s.prompt)
            for s in (w.next_spec() for _ in range(20))
        ]

    first = draw(5)
    assert first == draw(5) and first != draw(6)
    assert all(len(prompt.split()) == words for _, words, _, prompt in first)


# --- safety and config ----------------------------------------------------------------------


def test_refuses_non_loopback_hosts(capsys: pytest.CaptureFixture[str]) -> None:
    for url in (
        "http://127.0.0.1:8000",
        "http://127.3.2.1",
        "http://[::1]:9/v1",
        "http://localhost",
    ):
        check_loopback(url)
    for url in (
        "http://10.0.0.1:8000",
        "http://example.com",
        "http://0.0.0.0:8000",
        "http://127.0.0.1.nip.io",
    ):
        with pytest.raises(ValueError, match="non-loopback"):
            check_loopback(url)
    with pytest.raises(ValueError, match="non-loopback"):
        LoadConfig(models=["a"], url="http://192.168.1.5:8000", rate=1, num_requests=1)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "--url",
                "http://example.com:8000",
                "--models",
                "a",
                "--rate",
                "1",
                "--num-requests",
                "1",
            ]
        )
    assert exc.value.code == 2
    assert "refusing to send load to non-loopback host 'example.com'" in capsys.readouterr().err


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"rate .* or a concurrency"):
        LoadConfig(models=["a"], num_requests=1)
    with pytest.raises(ValueError, match="bound the run"):
        LoadConfig(models=["a"], concurrency=1)
    with pytest.raises(ValueError, match="needs num_requests"):
        LoadConfig(models=["a"], rate=math.inf, duration_s=1)
    with pytest.raises(ValueError, match="adapter_dist"):
        LoadConfig(models=["a"], rate=1, num_requests=1, adapter_dist="zipfian")  # type: ignore[arg-type]
    assert (
        endpoint_url("http://127.0.0.1:8000/", "chat")
        == "http://127.0.0.1:8000/v1/chat/completions"
    )
    assert endpoint_url("http://127.0.0.1:8000/v1", "completions").endswith("/v1/completions")


# --- against the fake server ----------------------------------------------------------------


def test_closed_loop_records_successes_and_each_error_kind(server: tuple[str, FastAPI]) -> None:
    url, _ = server
    models = ["ok-a", "fail-500", "fail-mid", "nousage-b", "nodone"]
    config = _config(url, models=models, adapter_dist="round-robin", concurrency=3, num_requests=15)
    result = asyncio.run(run_load(config))

    assert [r.index for r in result.records] == list(range(15))
    assert [r.adapter for r in result.records] == models * 3  # round-robin in issue order
    by_model: dict[str, list[RequestRecord]] = {}
    for r in result.records:
        by_model.setdefault(r.adapter, []).append(r)
    for r in by_model["ok-a"] + by_model["nousage-b"]:
        assert r.ok and r.status == 200 and r.error_kind is None
        assert 0 < r.ttft_s < r.e2e_s
        assert r.output_tokens == 5 and r.chunks == 5 and len(r.itl_s) == 4
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)
        # The server sleeps before every token; the client may see a late burst (the fake
        # server shares this process's GIL), so only the total is certain.
        assert r.e2e_s >= 5 * TOKEN_DELAY_S
    assert all(r.tokens_from_usage and r.prompt_tokens == 7 for r in by_model["ok-a"])
    assert not any(r.tokens_from_usage for r in by_model["nousage-b"])
    assert all(r.status == 500 and r.error == "boom" for r in by_model["fail-500"])
    assert all(r.error == "engine died" and r.chunks == 2 for r in by_model["fail-mid"])

    s = result.summary
    assert (s.num_requests, s.num_ok) == (15, 6)
    assert s.errors_by_kind == {"http_500": 3, "stream_error": 3, "incomplete_stream": 3}
    assert s.total_output_tokens == 30 and s.total_prompt_tokens == 21
    assert s.ttft_ms.count == 6 and s.itl_ms.count == 24
    assert s.request_throughput == pytest.approx(6 / result.elapsed_s)


def test_open_loop_chat_sends_the_scheduled_requests(server: tuple[str, FastAPI]) -> None:
    url, app = server
    app.state.bodies.clear()
    config = _config(
        url,
        endpoint="chat",
        models=["ok-x", "ok-y"],
        rate=80.0,
        duration_s=0.3,
        ignore_eos=True,
        output_len=LengthDist("uniform", 2, 4),
        seed=11,
    )
    result = asyncio.run(run_load(config))

    # The same seed gives the same arrival times: exactly those before 0.3 s were sent.
    offsets = arrival_offsets(
        80.0, 1.0, Workload(["x"], "uniform", LengthDist(), LengthDist(), 11).arrival_rng
    )
    expected = []
    while (t := next(offsets)) < 0.3:
        expected.append(t)
    assert [r.scheduled_s for r in result.records] == expected
    assert all(r.ok for r in result.records), result.summary.errors_by_kind
    assert all(r.output_tokens == r.max_tokens and 2 <= r.max_tokens <= 4 for r in result.records)
    assert all(r.start_s >= r.scheduled_s - 1e-3 for r in result.records)
    assert len(app.state.bodies) == len(expected)
    body = app.state.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["messages"][0]["role"] == "user"
    assert body["model"] in ("ok-x", "ok-y") and body["max_tokens"] in (2, 3, 4)


def test_stuck_requests_time_out_or_are_drained(server: tuple[str, FastAPI]) -> None:
    url, _ = server
    timed = _config(url, models=["hang"], concurrency=2, num_requests=2, request_timeout_s=0.2)
    result = asyncio.run(run_load(timed))
    assert result.summary.errors_by_kind == {"timeout": 2}

    drained = _config(
        url,
        models=["hang", "ok-a"],
        adapter_dist="round-robin",
        rate=100.0,
        num_requests=2,
        drain_timeout_s=0.3,
    )
    t = time.perf_counter()
    result = asyncio.run(run_load(drained))
    assert time.perf_counter() - t < 2
    assert result.summary.errors_by_kind == {"drain_timeout": 1}
    assert result.records[1].ok


def test_stream_parsing_over_mock_transport() -> None:
    """SSE comments, `event:` lines and a non-JSON data line, without a socket."""
    sse = ': keep-alive\n\nevent: message\ndata: {"choices": [{"text": "hi"}]}\n\ndata: {oops\n\n'

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    async def go() -> RequestRecord:
        record = RequestRecord(0, "a", 1, 1)
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await send_request(
                client, "http://127.0.0.1/v1/completions", {}, record, 5.0, time.perf_counter()
            )
        return record

    record = asyncio.run(go())
    assert record.chunks == 1 and record.ttft_s is not None
    assert record.error_kind == "bad_json" and record.error == "{oops"


@pytest.mark.slow
def test_cli_writes_json_and_png(server: tuple[str, FastAPI], tmp_path, capsys) -> None:
    url, _ = server
    out_json, out_png = tmp_path / "out.json", tmp_path / "out.png"
    code = main(
        [
            "--url",
            url,
            "--model-prefix",
            "ok",
            "--num-models",
            "3",
            "--adapter-dist",
            "zipf",
            "--concurrency",
            "4",
            "--num-requests",
            "12",
            "--output-len",
            "normal:4:1:2",
            "--slo-ttft-ms",
            "1000",
            "--slo-tpot-ms",
            "1000",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--fail-on-error",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT" in printed and "Goodput" in printed
    data = json.loads(out_json.read_text())
    assert data["summary"]["num_ok"] == 12 and data["summary"]["num_good"] == 12
    assert data["summary"]["ttft_ms"]["percentiles"].keys() == {"p50", "p90", "p99"}
    assert len(data["records"]) == 12
    assert {r["adapter"] for r in data["records"]} <= {"ok-0", "ok-1", "ok-2"}
    assert all(r["ok"] and r["ttft_s"] < r["e2e_s"] for r in data["records"])
    assert data["config"]["output_len"] == "normal:4:1:2"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


def test_rate_with_concurrency_caps_requests_in_flight(server: tuple[str, FastAPI]) -> None:
    url, _ = server
    config = _config(url, rate=math.inf, concurrency=2, num_requests=6)
    result = asyncio.run(run_load(config))
    assert result.summary.num_ok == 6
    spans = [(r.start_s, r.start_s + r.e2e_s) for r in result.records]
    for start, _ in spans:  # at each send, at most 2 requests (this one included) are running
        assert sum(s <= start < e for s, e in spans) <= 2
    assert all(r.scheduled_s == 0.0 for r in result.records)
