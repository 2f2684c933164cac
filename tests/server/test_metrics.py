"""/metrics after traffic over several adapters, parsed with prometheus-client's parser: request
counts and tokens by adapter, latency histograms, engine gauges, adapter residency and
evictions, vLLM's lora_requests_info, and bounded label values."""

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import generate_latest

from server.metrics import OUTCOMES, TIERS, UNRESOLVED, ServerMetrics
from tests.server.conftest import BASE, PROMPTS, LiveServer, start_real_server
from tests.server.exposition import Samples, parse_exposition


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Two host slots, so the traffic below evicts from the host (on the CPU the device slots
    # are host memory: one --max-loras slot does not bound them, each host adapter has one).
    server = start_real_server(tmp_path_factory.mktemp("metrics"), max_loras=1,
                               max_cpu_adapters=2)
    yield server
    server.stop()


def scrape(http: httpx.Client) -> tuple[Samples, dict[str, str]]:
    response = http.get("/metrics")
    assert response.status_code == 200
    return parse_exposition(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labels_of(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(key)[label] for (n, key) in samples if n == name and label in dict(key)}


def test_metrics_after_traffic(live: LiveServer) -> None:
    plan = [(BASE, 0, 3), ("goat0", 0, 4), ("goat0", 1, 5), ("goat1", 2, 6), ("lora0", 1, 2)]
    with live.http() as http:
        for model, i, max_tokens in plan:
            response = http.post("/v1/completions", json={
                "model": model, "prompt": PROMPTS[i], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            assert response.status_code == 200
        chat = http.post("/v1/chat/completions", json={
            "model": "goat1", "messages": [{"role": "user", "content": "w5"}], "max_tokens": 2,
            # greedy and past EOS: a sampled EOS (1 of 320 tokens) would end it at one token
            "temperature": 0, "ignore_eos": True, "stream": True})
        assert chat.status_code == 200
        # lora0 is loaded (goat0 has been evicted from the host by now): its own label
        assert http.post("/v1/completions", json={"model": "lora0", "prompt": "w5",
                                                   "temperature": 7}).status_code == 400
        assert http.post("/v1/completions", json={"model": "attacker-chosen-name",
                                                   "prompt": "w5"}).status_code == 404
        samples, types = scrape(http)

    def requests(adapter: str, outcome: str = "success") -> float:
        return value(samples, "goat_requests_total", adapter=adapter, outcome=outcome)

    assert types["goat_requests"] == "counter"
    assert (requests(BASE), requests("goat0"), requests("goat1"), requests("lora0")) == (
        1, 2, 2, 1)
    assert requests("lora0", "error") == 1
    assert "attacker-chosen-name" not in str(samples)
    expected_prompt = {BASE: 5, "goat0": 5 + 17, "goat1": 33 + 3, "lora0": 17}
    for adapter, tokens in expected_prompt.items():
        assert value(samples, "goat_prompt_tokens_total", adapter=adapter) == tokens
    assert value(samples, "goat_generation_tokens_total", adapter="goat0") == 9
    assert value(samples, "goat_generation_tokens_total", adapter="goat1") == 8
    for name in ("goat_time_to_first_token_seconds", "goat_e2e_request_latency_seconds",
                 "goat_request_queue_time_seconds", "goat_time_per_output_token_seconds"):
        assert types[name] == "histogram"
        assert value(samples, f"{name}_count", adapter="goat1") == 2, name
        assert value(samples, f"{name}_count", adapter="lora0") == 1, name
        # goat0 left host memory: its counters stay (above), its detail series went with it
        assert "goat0" not in labels_of(samples, f"{name}_count", "adapter"), name
    assert value(samples, "goat_e2e_request_latency_seconds_sum", adapter="goat1") > 0
    assert value(samples, "goat_batch_size_count") > 0
    assert value(samples, "goat_batch_adapters_count") > 0
    assert value(samples, "goat_batch_tokens_sum") >= sum(expected_prompt.values())
    assert value(samples, "goat_num_requests_running") == 0
    assert value(samples, "goat_num_requests_waiting") == 0
    assert 0.0 <= value(samples, "goat_kv_cache_usage_perc") <= 1.0
    # adapters: loads, where they reside, evictions (two host slots)
    for adapter in ("goat0", "goat1", "lora0"):
        assert value(samples, "goat_adapter_loads_total", adapter=adapter) >= 1
    assert value(samples, "goat_adapter_load_seconds_count") >= 3
    # goat1 ran last (the chat), lora0 before it, both in their slots; goat0 has left the host
    assert value(samples, "goat_adapter_resident", adapter="goat1", location="device") == 1
    assert value(samples, "goat_adapter_resident", adapter="lora0", location="device") == 1
    assert value(samples, "goat_adapter_resident", adapter="lora0", location="host") == 0
    assert "goat0" not in labels_of(samples, "goat_adapter_resident", "adapter")
    assert "goat0" not in labels_of(samples, "goat_router_expert_selections_total", "adapter")
    assert labels_of(samples, "goat_router_expert_selections_total", "adapter") == {"goat1"}
    assert value(samples, "goat_adapter_evictions_total", adapter="goat0", tier="host") >= 1
    assert sum(v for (n, _), v in samples.items()
               if n == "goat_adapter_evictions_total" and ("tier", "device") in _) == 0
    # bytes and adapters per tier: goat1 and lora0 on the host and in slots (on the CPU the
    # slot is an adapter's only copy: the host tier counts it)
    host = live.engine.engine.adapters
    assert value(samples, "goat_adapter_memory_adapters", tier="host") == 2
    assert all(host.get(n).in_slot for n in ("goat1", "lora0"))
    assert value(samples, "goat_adapter_memory_bytes", tier="host") == sum(
        host.slots.host_nbytes(host.get(n)) for n in ("goat1", "lora0")) > 0
    assert value(samples, "goat_adapter_memory_adapters", tier="device") == 2
    assert value(samples, "goat_adapter_memory_bytes", tier="device") > 0
    assert value(samples, "goat_adapter_slots") == host.slots.num_slots() >= 2
    assert value(samples, "goat_adapter_slot_bytes") == host.slots.slot_bytes() > 0
    # label values only from the base and loaded adapters (or the fixed UNRESOLVED)
    allowed = {BASE, "goat0", "goat1", "lora0", UNRESOLVED}
    for name in ("goat_requests_total", "goat_prompt_tokens_total",
                 "goat_e2e_request_latency_seconds_count", "goat_adapter_resident"):
        assert labels_of(samples, name, "adapter") <= allowed, name


def test_lora_requests_info_while_streaming(live: LiveServer) -> None:
    with live.http() as http:
        samples, types = scrape(http)
        assert types["vllm:lora_requests_info"] == "gauge"
        idle = [dict(k) for (n, k) in samples if n == "vllm:lora_requests_info"]
        assert idle == [{"running_lora_adapters": "", "waiting_lora_adapters": "",
                         "max_lora": "1"}]
        body = {"model": "goat1", "prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True,
                "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # keep it: dropping the iterator closes the stream
            assert next(lines).startswith("data: ")
            samples, _ = scrape(http)
        [(key, stamp)] = [(dict(k), v) for (n, k), v in samples.items()
                          if n == "vllm:lora_requests_info"]
        assert key["running_lora_adapters"] == "goat1"
        assert key["waiting_lora_adapters"] == ""
        assert abs(stamp - time.time()) < 60  # vLLM's value: a timestamp


def test_unresolved_adapter_label(live: LiveServer) -> None:
    """A request whose adapter fails to load is counted, but not under its name."""
    folder = live.adapter_dir / "corrupt"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{ not json")
    with live.http() as http:
        assert http.post("/v1/completions", json={"model": "corrupt", "prompt": "w5",
                                                   "max_tokens": 2}).status_code == 400
        samples, _ = scrape(http)
    assert value(samples, "goat_requests_total", adapter=UNRESOLVED, outcome="error") >= 1
    assert "corrupt" not in labels_of(samples, "goat_requests_total", "adapter")


def test_router_expert_selections_from_the_engine(live: LiveServer) -> None:
    with live.http() as http:
        assert http.post("/v1/completions", json={"model": "goat0", "prompt": PROMPTS[1],
                                                   "max_tokens": 4}).status_code == 200
        samples, _ = scrape(http)
    counts = {dict(k)["expert"]: v for (n, k), v in samples.items()
              if n == "goat_router_expert_selections_total" and ("adapter", "goat0") in k}
    assert set(counts) <= {"0", "1", "2", "3"} and sum(counts.values()) > 0


def test_listener_events_from_the_engine_thread() -> None:
    metrics = ServerMetrics(max_loras=3)

    def engine_thread() -> None:
        metrics.on_step(4, 40, ["a", "b", "a"])
        metrics.on_step_time(0.02)
        metrics.on_step_time(0.5)
        metrics.on_adapter_loaded("a", 0.25)
        metrics.on_adapter_location("a", "device")
        metrics.on_adapter_location("a", "host")
        metrics.on_adapter_evicted("a", "device")
        metrics.on_expert_selections("a", [3, 0, 5, 1])
        metrics.on_expert_selections("a", [1, 0, 0, 0])
        metrics.on_adapter_slots(5, 1234, True)  # an accelerator's pool
        metrics.on_adapter_slots(64, 512, False)  # a CPU's: its slots bound no step

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    assert value(samples, "goat_batch_adapters_sum") == 2
    assert value(samples, "goat_adapter_slots") == 64
    assert value(samples, "goat_adapter_slot_bytes") == 512
    assert metrics.max_loras == 5  # vllm:lora_requests_info's max_lora: the bounding pool's
    assert value(samples, "goat_batch_size_sum") == 4
    assert value(samples, "goat_step_seconds_count") == 2
    assert value(samples, "goat_step_seconds_bucket", le="0.0238") == 1  # 25 % apart
    assert value(samples, "goat_step_seconds_bucket", le="0.4337") == 1
    assert value(samples, "goat_step_seconds_bucket", le="0.5421") == 2
    assert value(samples, "goat_adapter_resident", adapter="a", location="host") == 1
    assert value(samples, "goat_adapter_resident", adapter="a", location="device") == 0
    assert value(samples, "goat_adapter_evictions_total", adapter="a", tier="device") == 1
    assert value(samples, "goat_router_expert_selections_total", adapter="a", expert="0") == 4
    assert value(samples, "goat_router_expert_selections_total", adapter="a", expert="2") == 5
    # every expert's series exists from the adapter's first step, at zero if never chosen
    assert samples[("goat_router_expert_selections_total",
                    frozenset({("adapter", "a"), ("expert", "1")}))] == 0
    # two apps' metrics live side by side: separate registries
    assert ServerMetrics().registry is not metrics.registry


class _Engine:
    base_name = "the-base"

    def stats(self) -> None:
        return None


def test_counters_have_samples_from_start_up() -> None:
    """rate() works from the first scrape: the base's and UNRESOLVED's request series exist at
    zero before any request, an adapter's (evictions in both tiers included) from its load."""
    metrics = ServerMetrics(max_loras=2)
    metrics.attach(_Engine())
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    for outcome in OUTCOMES:
        for label in ("the-base", UNRESOLVED):
            key = ("goat_requests_total", frozenset({("adapter", label), ("outcome", outcome)}))
            assert samples[key] == 0, key
    for name in ("goat_prompt_tokens_total", "goat_generation_tokens_total",
                 "goat_time_to_first_token_seconds_count",
                 "goat_e2e_request_latency_seconds_count"):
        assert samples[(name, frozenset({("adapter", "the-base")}))] == 0, name
    assert value(samples, "goat_batch_size_count") == 0
    assert not labels_of(samples, "goat_adapter_evictions_total", "adapter")

    metrics.on_adapter_loaded("a", 0.1)
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    for tier in TIERS:
        assert samples[("goat_adapter_evictions_total",
                        frozenset({("adapter", "a"), ("tier", tier)}))] == 0, tier
    assert samples[("goat_requests_total",
                    frozenset({("adapter", "a"), ("outcome", "error")}))] == 0
    assert value(samples, "goat_adapter_loads_total", adapter="a") == 1


def test_unload_removes_the_adapters_series(live: LiveServer) -> None:
    """After /v1/unload_lora_adapter no series names the adapter; the others keep theirs."""
    with live.http() as http:
        assert http.post("/v1/load_lora_adapter", json={
            "lora_name": "gone", "lora_path": str(live.adapter_dir / "goat1")}).status_code == 200
        for model in ("gone", BASE):
            assert http.post("/v1/completions", json={"model": model, "prompt": PROMPTS[0],
                                                       "max_tokens": 2}).status_code == 200
        before, _ = scrape(http)
        assert http.post("/v1/unload_lora_adapter",
                         json={"lora_name": "gone"}).status_code == 200
        after, _ = scrape(http)
    named = {key for key in before if ("adapter", "gone") in key[1]}
    assert {n for n, _ in named} >= {
        "goat_requests_total", "goat_prompt_tokens_total", "goat_adapter_loads_total",
        "goat_adapter_evictions_total", "goat_adapter_resident",
        "goat_router_expert_selections_total", "goat_e2e_request_latency_seconds_bucket"}
    assert not [key for key in after if ("adapter", "gone") in key[1]]
    assert value(after, "goat_requests_total", adapter=BASE, outcome="success") >= 1


def _series_of(metrics: ServerMetrics, adapter: str) -> set[str]:
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    return {name for name, key in samples
            if ("adapter", adapter) in key and not name.endswith("_created")}


def test_detail_series_only_while_in_host_memory() -> None:
    """An adapter evicted from host memory keeps its counters and loses its histograms, expert
    selections and residency, so a scrape follows the adapters loaded, not the store; a request
    that ends after the eviction does not bring them back, a reload does (at zero)."""
    metrics = ServerMetrics()
    counters = {"goat_requests_total", "goat_prompt_tokens_total",
                "goat_generation_tokens_total", "goat_adapter_loads_total",
                "goat_adapter_evictions_total"}
    metrics.on_adapter_loaded("a", 0.1)
    metrics.on_adapter_location("a", "host")
    metrics.on_expert_selections("a", [2, 0])
    tracker = metrics.track("a", "a", 1, "")
    tracker.started("a")
    loaded = _series_of(metrics, "a")
    assert loaded >= counters | {"goat_adapter_resident", "goat_router_expert_selections_total",
                                 "goat_time_to_first_token_seconds_bucket"}

    metrics.on_adapter_evicted("a", "host")
    metrics.on_adapter_location("a", None)
    tracker.finish("success", prompt_tokens=3, generation_tokens=4, longest_completion=4)
    metrics.on_expert_selections("a", [1, 1])  # a step's report that lost the race
    metrics.on_adapter_location("a", "device")
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    assert _series_of(metrics, "a") == counters
    assert value(samples, "goat_requests_total", adapter="a", outcome="success") == 1
    assert value(samples, "goat_generation_tokens_total", adapter="a") == 4
    assert value(samples, "goat_adapter_evictions_total", adapter="a", tier="host") == 1

    metrics.on_adapter_loaded("a", 0.1)
    metrics.on_adapter_location("a", "host")
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    assert _series_of(metrics, "a") >= loaded - {"goat_router_expert_selections_total"}
    assert value(samples, "goat_time_to_first_token_seconds_count", adapter="a") == 0
    assert value(samples, "goat_adapter_loads_total", adapter="a") == 2

    # 300 adapters through a host tier of 4: the exposition's size is that of 4 loaded ones
    # and 300 sets of counters
    for i in range(300):
        metrics.on_adapter_loaded(f"x{i}", 0.1)
        metrics.on_adapter_location(f"x{i}", "host")
        metrics.on_expert_selections(f"x{i}", [1] * 8)
        if i >= 4:
            metrics.on_adapter_location(f"x{i - 4}", None)
    samples, _ = parse_exposition(generate_latest(metrics.registry).decode())
    last = {f"x{i}" for i in range(296, 300)}
    for name in ("goat_time_to_first_token_seconds_count", "goat_adapter_resident",
                 "goat_router_expert_selections_total"):
        assert labels_of(samples, name, "adapter") - {"a"} == last, name
    assert len(labels_of(samples, "goat_requests_total", "adapter")) == 300 + 1  # and a
