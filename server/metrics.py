"""Prometheus metrics, prefixed `goat_`, in a registry of their own (several apps can live in one
process), plus vLLM's `vllm:lora_requests_info` for gateways that route on it. An engine that
keeps metrics of its own (vLLM's `vllm:` families) offers them as `native_metric_families()`;
they are served in the same exposition.

`ServerMetrics` is also the engine's `EngineListener`. Adapter label values only ever come from
adapters the engine has loaded, or the base's served name; a request whose adapter never loaded
is counted under UNRESOLVED, so a client cannot mint label values.

Per-key families (`goat_key_*`, label `key`) count each API key's requests, tokens, rate-limit
refusals and queue time; their label values are the key file's ids only (set_keys, at start and
on every reload: a removed key's series go), so cardinality is bounded by the key file.

Series exist from the moment their label values are known, at zero, so that `rate()` sees the
first increase: the base's and UNRESOLVED's at start-up, an adapter's at its load (every outcome,
both eviction tiers), a GOAT adapter's per-expert selections at its first routed step (its
expert count is known then). An adapter's series are removed when it is unloaded
(`forget_adapter`). One evicted from host memory keeps its counters (requests, tokens, loads,
evictions: a few series each, bounded by the adapter store) but loses its detail series (latency
histograms, expert selections, residency: about a hundred), which exist only while it is loaded;
so a scrape's size follows the adapters in host memory, not the thousands a store may hold.
"""

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# No `*_created` series: in the text format /metrics speaks they are one more gauge per counter
# and histogram, which Prometheus stores as any other (it reads creation times from OpenMetrics
# only); they were half the lines of a thousand adapters' counters. (The flag is the process's.)
disable_created_metrics()  # type: ignore[no-untyped-call]

UNRESOLVED = "_unresolved"  # cannot collide: adapter names start with a letter or digit

_LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
              0.75, 1.0, 2.5)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Step times from 5 ms to 20 s, each bucket 1.25x the last: fine enough to read a step's
# median and its longest stall from bucket bounds within 25 %.
_STEP = tuple(round(0.005 * 1.25**i, 4) for i in range(38))
_ADAPTERS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
OUTCOMES = ("success", "error", "abort", "rejected")
RATE_LIMITS = ("requests", "tokens", "concurrent")
TOKEN_KINDS = ("prompt", "generation")
TIERS = ("device", "host")
STORES = ("s3", "hf")  # remote adapter stores (goat_runtime/adapters/store.py)


class RequestTracker:
    """One API request's life: waiting until its first output, then running, then finished."""

    def __init__(self, metrics: "ServerMetrics", label: str, lora: str | None, seqs: int,
                 key: str, on_finish: Callable[[int], None] | None = None):
        self._metrics = metrics
        self.key = key  # the API key's id
        self._on_finish = on_finish  # gets the tokens used (prompt + generated)
        self.label = label  # the adapter label, final once the adapter has produced output
        self.lora = lora  # adapter name for vllm:lora_requests_info; None for the base
        self.seqs = seqs  # engine sequences it occupies (prompts x n)
        self.arrival = time.monotonic()
        self.first_output: float | None = None
        self.done = False

    def started(self, label: str) -> None:
        """The first output arrived: the adapter is loaded, so its name is a safe label."""
        if self.first_output is None:
            self.first_output = time.monotonic()
            self.label = label

    def finish(self, outcome: str, prompt_tokens: int = 0, generation_tokens: int = 0,
               timings: list[dict[str, float]] | None = None,
               longest_completion: int = 0) -> None:
        """Record the outcome ("success", "error", "abort" or "rejected") once."""
        if self.done:
            return
        self.done = True
        m = self._metrics
        m._forget(self)
        if self._on_finish is not None:
            self._on_finish(prompt_tokens + generation_tokens)
        m.requests.labels(self.label, outcome).inc()
        m.key_requests.labels(self.key, outcome).inc()
        if prompt_tokens:
            m.prompt_tokens.labels(self.label).inc(prompt_tokens)
            m.key_tokens.labels(self.key, "prompt").inc(prompt_tokens)
        if generation_tokens:
            m.generation_tokens.labels(self.label).inc(generation_tokens)
            m.key_tokens.labels(self.key, "generation").inc(generation_tokens)
        if outcome != "success":
            return
        now = time.monotonic()
        timing = _merge_timings(timings or [])
        arrival = timing.get("arrival_time", self.arrival)
        first_token = timing.get("first_token_time", self.first_output or now)
        finished = timing.get("finished_time", now)
        queued = (max(0.0, timing["first_scheduled_time"] - arrival)
                  if "first_scheduled_time" in timing else None)
        if queued is not None:
            m.key_queue_time.labels(self.key).observe(queued)
        with m._detail(self.label) as detailed:
            if not detailed:
                return
            m.ttft.labels(self.label).observe(max(0.0, first_token - arrival))
            m.e2e.labels(self.label).observe(max(0.0, finished - arrival))
            if queued is not None:
                m.queue_time.labels(self.label).observe(queued)
            if longest_completion > 1:
                m.tpot.labels(self.label).observe(
                    max(0.0, finished - first_token) / (longest_completion - 1))


def _merge_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    """One request's timings from its engine requests' (several prompts): earliest start, latest
    end."""
    merged: dict[str, float] = {}
    for timing in timings:
        for key, value in timing.items():
            pick = max if key == "finished_time" else min
            merged[key] = pick(merged[key], value) if key in merged else value
    return merged


class ServerMetrics:
    """The server's metrics and the engine's listener (called from the engine thread)."""

    def __init__(self, max_loras: int = 0, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.max_loras = max_loras
        self._engine: Any = None
        self._lock = threading.Lock()
        self._in_flight: set[RequestTracker] = set()
        self._experts: dict[str, int] = {}  # adapter -> experts whose series exist
        self._detailed: set[str] = set()  # labels whose detail series exist (loaded adapters)
        r = self.registry
        self.requests = Counter("goat_requests", "API requests by adapter and outcome "
                                "(success, error, abort, rejected).", ["adapter", "outcome"],
                                registry=r)
        self.prompt_tokens = Counter("goat_prompt_tokens", "Prompt tokens processed.",
                                     ["adapter"], registry=r)
        self.generation_tokens = Counter("goat_generation_tokens", "Tokens generated.",
                                         ["adapter"], registry=r)
        self.ttft = Histogram("goat_time_to_first_token_seconds", "Time to first token.",
                              ["adapter"], buckets=_LATENCY, registry=r)
        self.tpot = Histogram("goat_time_per_output_token_seconds",
                              "Time per output token after the first.", ["adapter"],
                              buckets=_PER_TOKEN, registry=r)
        self.e2e = Histogram("goat_e2e_request_latency_seconds", "End-to-end request latency.",
                             ["adapter"], buckets=_LATENCY, registry=r)
        self.queue_time = Histogram("goat_request_queue_time_seconds",
                                    "Time from arrival to first scheduling.", ["adapter"],
                                    buckets=_LATENCY, registry=r)
        self.batch_size = Histogram("goat_batch_size", "Sequences per engine step.",
                                    buckets=_COUNTS, registry=r)
        self.batch_tokens = Histogram("goat_batch_tokens", "Tokens per engine step.",
                                      buckets=_COUNTS, registry=r)
        self.batch_adapters = Histogram("goat_batch_adapters",
                                        "Distinct adapters per engine step.",
                                        buckets=_ADAPTERS, registry=r)
        self.step_seconds = Histogram("goat_step_seconds", "Wall time of an engine step that "
                                      "ran sequences.", buckets=_STEP, registry=r)
        self.adapter_loads = Counter("goat_adapter_loads", "Adapters loaded from disk.",
                                     ["adapter"], registry=r)
        self.adapter_load_seconds = Histogram("goat_adapter_load_seconds",
                                              "Time to load an adapter.", buckets=_LATENCY,
                                              registry=r)
        self.adapter_evictions = Counter("goat_adapter_evictions",
                                         "Adapters evicted, by tier left (device or host).",
                                         ["adapter", "tier"], registry=r)
        self.adapter_resident = Gauge("goat_adapter_resident",
                                      "1 where a loaded adapter resides (device or host), else 0; "
                                      "absent once it has left host memory.",
                                      ["adapter", "location"], registry=r)
        self.adapter_memory_bytes = Gauge(
            "goat_adapter_memory_bytes", "Bytes of adapters by tier: host (loaded adapters' "
            "tensors and static terms) and device (the slot tensors).", ["tier"], registry=r)
        self.adapter_memory_adapters = Gauge(
            "goat_adapter_memory_adapters", "Adapters resident by tier (host, device).",
            ["tier"], registry=r)
        for tier in TIERS:
            self.adapter_memory_bytes.labels(tier)
            self.adapter_memory_adapters.labels(tier)
        self.adapter_slots = Gauge(
            "goat_adapter_slots", "Adapter slots in the device pool (the base's own not "
            "counted): on an accelerator the most distinct adapters a step serves (from "
            "--max-gpu-adapter-memory and --max-loras); on the CPU the pool's size, not a "
            "bound.", registry=r)
        self.adapter_slot_bytes = Gauge(
            "goat_adapter_slot_bytes", "Bytes one device slot takes at the pool's size (the "
            "largest rank and expert count in it).", registry=r)
        self.adapter_downloads = Counter("goat_adapter_downloads",
                                         "Remote adapters downloaded, by store (s3, hf).",
                                         ["store"], registry=r)
        self.adapter_download_bytes = Counter("goat_adapter_download_bytes",
                                              "Bytes of remote adapters downloaded.",
                                              ["store"], registry=r)
        self.adapter_download_failures = Counter(
            "goat_adapter_download_failures", "Remote adapter fetches that failed, by store and "
            "reason (not_found, too_large, pickle, invalid, denied, timeout, network).",
            ["store", "reason"], registry=r)
        for store in STORES:
            self.adapter_downloads.labels(store)
            self.adapter_download_bytes.labels(store)
        self.expert_selections = Counter("goat_router_expert_selections",
                                         "GOAT router top-k selections per expert, summed over "
                                         "layers and modules.", ["adapter", "expert"],
                                         registry=r)
        self.key_requests = Counter("goat_key_requests", "API requests by API key id and "
                                    "outcome (success, error, abort, rejected).",
                                    ["key", "outcome"], registry=r)
        self.key_tokens = Counter("goat_key_tokens", "Tokens by API key id and kind (prompt, "
                                  "generation).", ["key", "kind"], registry=r)
        self.key_rate_limited = Counter("goat_key_rate_limited", "Requests refused with 429 "
                                        "by API key id and limit (requests, tokens, "
                                        "concurrent).", ["key", "limit"], registry=r)
        self.key_queue_time = Histogram("goat_key_queue_time_seconds", "Time from arrival to "
                                        "first scheduling, by API key id.", ["key"],
                                        buckets=_LATENCY, registry=r)
        self._keys: set[str] = set()
        r.register(_LiveCollector(self))

    def attach(self, engine: Any) -> None:
        """The engine whose stats() feed the running/waiting/KV gauges at scrape time; the
        base's and UNRESOLVED's request series start at zero."""
        self._engine = engine
        for outcome in OUTCOMES:
            self.requests.labels(UNRESOLVED, outcome)
        base = getattr(engine, "base_name", None)
        if base:
            self._request_series(base)

    def _latency(self) -> tuple[Any, ...]:
        return (self.ttft, self.tpot, self.e2e, self.queue_time)

    def _request_series(self, label: str) -> None:
        for outcome in OUTCOMES:
            self.requests.labels(label, outcome)
        for metric in (self.prompt_tokens, self.generation_tokens, *self._latency()):
            metric.labels(label)
        with self._lock:
            self._detailed.add(label)

    @contextlib.contextmanager
    def _detail(self, label: str) -> Iterator[bool]:
        """Whether `label`'s detail series exist, held so they cannot go meanwhile (an adapter
        evicted between its last step and its request's end is not recreated)."""
        with self._lock:
            yield label in self._detailed

    def _drop_detail(self, name: str) -> None:
        """Remove an adapter's detail series: latency histograms, expert selections, residency."""
        with self._lock:
            self._detailed.discard(name)
            experts = self._experts.pop(name, 0)
        labels: list[tuple[Any, tuple[str, ...]]] = [
            *((m, (name,)) for m in self._latency()),
            *((self.adapter_resident, (name, t)) for t in TIERS),
            *((self.expert_selections, (name, str(e))) for e in range(experts))]
        for metric, values in labels:
            with contextlib.suppress(KeyError):  # never created (older clients raise)
                metric.remove(*values)

    def _key_series(self) -> list[tuple[Any, tuple[str, ...]]]:
        return [*((self.key_requests, ("", o)) for o in OUTCOMES),
                *((self.key_tokens, ("", k)) for k in TOKEN_KINDS),
                *((self.key_rate_limited, ("", limit)) for limit in RATE_LIMITS),
                (self.key_queue_time, ("",))]

    def set_keys(self, ids: list[str]) -> None:
        """The key ids labels may take: their series start at zero, removed keys' go."""
        with self._lock:
            old, self._keys = self._keys, set(ids)
        for metric, values in self._key_series():
            for key in old - set(ids):
                with contextlib.suppress(KeyError):
                    metric.remove(key, *values[1:])
            for key in ids:
                metric.labels(key, *values[1:])

    def refused(self, label: str, key: str, outcome: str, limit: str | None = None) -> None:
        """A request refused before it ran: bad parameters ("error"), the queue or a key's
        limit ("rejected"; `limit` names which)."""
        self.requests.labels(label, outcome).inc()
        self.key_requests.labels(key, outcome).inc()
        if limit is not None:
            self.key_rate_limited.labels(key, limit).inc()

    def forget_adapter(self, name: str) -> None:
        """Remove every series labelled with an unloaded adapter."""
        self._drop_detail(name)
        labels: list[tuple[Any, tuple[str, ...]]] = [
            *((self.requests, (name, o)) for o in OUTCOMES),
            *((m, (name,)) for m in (self.prompt_tokens, self.generation_tokens,
                                     self.adapter_loads)),
            *((self.adapter_evictions, (name, t)) for t in TIERS)]
        for metric, values in labels:
            with contextlib.suppress(KeyError):  # never created (older clients raise)
                metric.remove(*values)

    # ---- requests (event loop) ----

    def track(self, label: str, lora: str | None, seqs: int, key: str,
              on_finish: Callable[[int], None] | None = None) -> RequestTracker:
        tracker = RequestTracker(self, label, lora, seqs, key, on_finish)
        with self._lock:
            self._in_flight.add(tracker)
        return tracker

    def _forget(self, tracker: RequestTracker) -> None:
        with self._lock:
            self._in_flight.discard(tracker)

    def in_flight_seqs(self) -> int:
        with self._lock:
            return sum(t.seqs for t in self._in_flight)

    def lora_requests(self) -> tuple[list[str], list[str]]:
        """Adapters of running and of waiting requests (vLLM's lora_requests_info)."""
        with self._lock:
            trackers = list(self._in_flight)
        running = sorted({t.lora for t in trackers if t.lora and t.first_output is not None})
        waiting = sorted({t.lora for t in trackers if t.lora and t.first_output is None})
        return running, waiting

    # ---- EngineListener (engine thread) ----

    def on_step(self, num_seqs: int, num_tokens: int, adapters: list[str]) -> None:
        self.batch_size.observe(num_seqs)
        self.batch_tokens.observe(num_tokens)
        self.batch_adapters.observe(len(set(adapters)))

    def on_step_time(self, seconds: float) -> None:
        self.step_seconds.observe(seconds)

    def on_adapter_loaded(self, name: str, seconds: float) -> None:
        self._request_series(name)
        for tier in TIERS:
            self.adapter_evictions.labels(name, tier)
        self.adapter_loads.labels(name).inc()
        self.adapter_load_seconds.observe(seconds)

    def on_adapter_evicted(self, name: str, tier: str) -> None:
        self.adapter_evictions.labels(name, tier).inc()

    def on_adapter_location(self, name: str, location: str | None) -> None:
        if location is None:  # out of host memory (evicted or unloaded): absent is not resident
            self._drop_detail(name)
            return
        with self._detail(name) as detailed:
            for place in TIERS if detailed else ():
                self.adapter_resident.labels(name, place).set(1 if place == location else 0)

    def on_adapter_memory(self, tier: str, adapters: int, nbytes: int) -> None:
        self.adapter_memory_bytes.labels(tier).set(nbytes)
        self.adapter_memory_adapters.labels(tier).set(adapters)

    def on_adapter_slots(self, slots: int, slot_bytes: int, bounded: bool) -> None:
        self.adapter_slots.set(slots)
        self.adapter_slot_bytes.set(slot_bytes)
        if bounded:  # vllm:lora_requests_info's max_lora: what a step can serve now
            self.max_loras = slots

    def on_adapter_download(self, store: str, nbytes: int, seconds: float) -> None:
        self.adapter_downloads.labels(store).inc()
        self.adapter_download_bytes.labels(store).inc(nbytes)

    def on_adapter_download_failed(self, store: str, reason: str) -> None:
        self.adapter_download_failures.labels(store, reason).inc()

    def on_expert_selections(self, adapter: str, counts: list[int]) -> None:
        with self._detail(adapter) as detailed:
            if not detailed:
                return
            known = self._experts.get(adapter, 0)
            self._experts[adapter] = max(known, len(counts))
            for expert, count in enumerate(counts):
                if count or expert >= known:  # every expert's series, from the first step
                    self.expert_selections.labels(adapter, str(expert)).inc(count)


class _LiveCollector(Collector):
    """Gauges read at scrape time: the engine's queue and KV cache, and vLLM's LoRA info."""

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        engine = self._metrics._engine
        native = getattr(engine, "native_metric_families", None)
        names = set()
        for family in native() if native is not None else ():
            names.add(family.name)
            yield family
        stats = engine.stats() if engine is not None else None
        yield GaugeMetricFamily("goat_num_requests_running", "Requests running in the engine.",
                                value=stats.num_running if stats else 0)
        yield GaugeMetricFamily("goat_num_requests_waiting", "Requests waiting in the engine.",
                                value=stats.num_waiting if stats else 0)
        yield GaugeMetricFamily("goat_kv_cache_usage_perc",
                                "Fraction of KV cache blocks in use (0..1).",
                                value=stats.kv_cache_usage if stats else 0.0)
        if "vllm:lora_requests_info" in names:  # the engine's own, one family per name
            return
        running, waiting = self._metrics.lora_requests()
        # As vLLM exports it: label values are comma-joined adapter names, the value is the
        # time of the reading. One series at a time, so cardinality stays bounded.
        info = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on lora requests.",
                                 labels=["running_lora_adapters", "max_lora",
                                         "waiting_lora_adapters"])
        info.add_metric([",".join(running), str(self._metrics.max_loras), ",".join(waiting)],
                        time.time())
        yield info
