"""Load generator for OpenAI-compatible servers with many adapters (goat-serve, vLLM with LoRA).

Sends streaming completions or chat requests whose `model` names the adapter, open loop (Poisson
or gamma arrivals at a rate) or closed loop (a fixed number of concurrent clients), and measures
TTFT, TPOT, ITL and end-to-end latency per request. Loopback only: it is for benchmarking a local
server, never for pointing load at someone else's.

    python -m loadtests.loadgen --url http://127.0.0.1:8000 --model-prefix goat --num-models 16 \
        --adapter-dist zipf --rate 4 --duration 60 --json out.json --plot out.png

Python: `result = await run_load(LoadConfig(...))`, then `result.summary`, `result.records`.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from loadtests.report import (
    RequestRecord,
    Summary,
    format_summary,
    jsonable,
    summarize,
    write_plot,
)
from loadtests.stream import send_request
from loadtests.workload import (
    ADAPTER_DISTS,
    AdapterDist,
    LengthDist,
    RequestSpec,
    Workload,
    arrival_offsets,
)

Endpoint = Literal["completions", "chat"]
_ENDPOINT_PATHS = {"completions": "/completions", "chat": "/chat/completions"}


def check_loopback(url: str) -> httpx.URL:
    """Parse `url` and refuse anything but http(s) to a loopback address (localhost, 127/8, ::1).

    Host names other than `localhost` are refused without resolving them: a load generator must
    not be one DNS change away from hitting a remote machine.
    """
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"url must be http:// or https://, got {url!r}")
    host = parsed.host
    if host == "localhost":
        return parsed
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"refusing to send load to non-loopback host {host!r} in {url!r}: the load generator "
            "only targets servers on this machine (use 127.0.0.1, ::1 or localhost)"
        )
    return parsed


def endpoint_url(base: str, endpoint: Endpoint) -> str:
    """Accept `http://host:port`, `.../v1` or a full `.../completions` URL."""
    base = base.rstrip("/")
    if base.endswith("/completions"):
        return base
    if not base.endswith("/v1"):
        base += "/v1"
    return base + _ENDPOINT_PATHS[endpoint]


@dataclass
class LoadConfig:
    """One load run. Give `rate` (open loop), `concurrency` (closed loop) or both (open loop with
    at most `concurrency` requests in flight), and `num_requests` and/or `duration_s` to bound it.
    """

    models: list[str]
    url: str = "http://127.0.0.1:8000"
    endpoint: Endpoint = "completions"
    rate: float | None = None  # req/s; math.inf sends every request at once
    burstiness: float = 1.0  # gamma shape of inter-arrival times; 1.0 = Poisson
    concurrency: int | None = None
    adapter_dist: AdapterDist = "uniform"
    zipf_alpha: float = 1.0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 32))
    ignore_eos: bool = False
    temperature: float | None = 0.0
    num_requests: int | None = None
    duration_s: float | None = None  # stop issuing after this; in-flight requests then drain
    drain_timeout_s: float = 60.0  # how long to wait for in-flight requests after issuing stops
    request_timeout_s: float = 300.0  # total time one request may take
    seed: int | None = 0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        self._validate_target()
        self._validate_arrivals()
        self._validate_adapter_mix()
        self._validate_bounds()

    def _validate_target(self) -> None:
        check_loopback(self.url)
        if not self.models or any(not m for m in self.models):
            raise ValueError(f"models must be non-empty adapter names, got {self.models!r}")
        if self.endpoint not in _ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be completions or chat, not {self.endpoint!r}")

    def _validate_arrivals(self) -> None:
        if self.rate is None and self.concurrency is None:
            raise ValueError("give a rate (open loop) or a concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 req/s (or inf), got {self.rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")

    def _validate_adapter_mix(self) -> None:
        if self.adapter_dist not in ADAPTER_DISTS:
            raise ValueError(
                f"adapter_dist must be one of {ADAPTER_DISTS}, not {self.adapter_dist!r}"
            )
        if self.zipf_alpha < 0:
            raise ValueError(f"zipf_alpha must be >= 0, got {self.zipf_alpha}")

    def _validate_bounds(self) -> None:
        """How the run ends: a request count and/or a duration, and the timeouts."""
        if self.num_requests is None and self.duration_s is None:
            raise ValueError("bound the run with num_requests and/or duration_s")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.rate is not None and math.isinf(self.rate) and self.num_requests is None:
            raise ValueError("rate=inf sends everything at once: it needs num_requests")
        if self.drain_timeout_s < 0 or not self.request_timeout_s > 0:
            raise ValueError("drain_timeout_s must be >= 0 and request_timeout_s > 0")

    @property
    def mode(self) -> str:
        return "open-loop" if self.rate is not None else "closed-loop"

    def workload(self) -> Workload:
        """The requests this load sends, in order (one seed: the same for every run)."""
        return Workload(self.models, self.adapter_dist, self.prompt_len, self.output_len,
                        self.seed, self.zipf_alpha)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready data, with the API key redacted."""
        data = asdict(self)
        data["prompt_len"] = str(self.prompt_len)
        data["output_len"] = str(self.output_len)
        if self.api_key:
            data["api_key"] = "<redacted>"
        return jsonable(data)


@dataclass
class LoadResult:
    """Per-request records (in issue order) and their summary."""

    config: LoadConfig
    records: list[RequestRecord]
    summary: Summary
    started_at: float  # unix time of the start
    elapsed_s: float

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "config": self.config.to_dict(),
                "started_at": self.started_at,
                "summary": asdict(self.summary),
                "records": [r.to_dict() for r in self.records],
            }
        )

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")

    def write_plot(self, path: str | Path) -> None:
        write_plot(self.records, self.summary, path)


def build_payload(config: LoadConfig, spec: RequestSpec) -> dict[str, Any]:
    """The request body: streaming with usage, max_tokens = the drawn output length."""
    body: dict[str, Any] = {"model": spec.adapter}
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    body["max_tokens"] = spec.max_tokens
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra sampling field: generate exactly max_tokens
    body.update(config.extra_body)
    return body


class _Run:
    """State of one run: the workload, the records and the tasks that fill them."""

    def __init__(self, config: LoadConfig, client: httpx.AsyncClient) -> None:
        self.config = config
        self.client = client
        self.url = endpoint_url(config.url, config.endpoint)
        self.workload = config.workload()
        self.records: list[RequestRecord] = []
        self.t0 = time.perf_counter()
        self.slots = asyncio.Semaphore(config.concurrency) if config.concurrency else None

    def _count_reached(self) -> bool:
        return (
            self.config.num_requests is not None and len(self.records) >= self.config.num_requests
        )

    def _may_issue(self) -> bool:
        c = self.config
        if self._count_reached():
            return False
        return c.duration_s is None or time.perf_counter() - self.t0 < c.duration_s

    def _new_record(self, scheduled_s: float | None) -> tuple[RequestSpec, RequestRecord]:
        spec = self.workload.next_spec()
        record = RequestRecord(
            spec.index, spec.adapter, spec.prompt_words, spec.max_tokens, scheduled_s=scheduled_s
        )
        self.records.append(record)
        return spec, record

    async def _send(self, spec: RequestSpec, record: RequestRecord) -> None:
        body = build_payload(self.config, spec)
        await send_request(
            self.client, self.url, body, record, self.config.request_timeout_s, self.t0
        )

    async def _send_gated(self, spec: RequestSpec, record: RequestRecord) -> None:
        if self.slots is None:
            await self._send(spec, record)
            return
        async with self.slots:
            await self._send(spec, record)

    async def open_loop(self) -> list[asyncio.Task[None]]:
        """Issue requests at their arrival times; returns the request tasks to drain."""
        c = self.config
        assert c.rate is not None
        arrivals = arrival_offsets(c.rate, c.burstiness, self.workload.arrival_rng)
        tasks: list[asyncio.Task[None]] = []
        for at in arrivals:  # the duration bound applies to scheduled times, so it is exact
            if self._count_reached() or (c.duration_s is not None and at >= c.duration_s):
                break
            delay = self.t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            spec, record = self._new_record(at)
            tasks.append(asyncio.create_task(self._send_gated(spec, record)))
        return tasks

    async def closed_loop(self) -> list[asyncio.Task[None]]:
        """Run `concurrency` clients back to back until issuing stops; returns them to drain."""
        assert self.config.concurrency is not None
        issuing_over = asyncio.Event()

        async def client_loop() -> None:
            while self._may_issue():
                spec, record = self._new_record(None)
                if not self._may_issue():
                    issuing_over.set()  # that was the last request: start the drain clock
                await self._send(spec, record)
            issuing_over.set()

        workers = [asyncio.create_task(client_loop()) for _ in range(self.config.concurrency)]
        waiters = [asyncio.create_task(issuing_over.wait())]
        if self.config.duration_s is not None:
            waiters.append(asyncio.create_task(asyncio.sleep(self.config.duration_s)))
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        return workers

    async def drain(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        """Wait up to the drain timeout for in-flight requests, then cancel and mark the rest."""
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.config.drain_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for record in self.records:
            if record.e2e_s is None and record.error_kind is None:
                record.error_kind = "drain_timeout"
                record.error = (
                    f"still running {self.config.drain_timeout_s:g} s after issuing stopped"
                )


async def run_load(config: LoadConfig, client: httpx.AsyncClient | None = None) -> LoadResult:
    """Run the configured load and return the records and summary.

    `client` lets callers supply their own (e.g. a mock transport); by default one is made with
    no connection limit, so the client never becomes the queue being measured, and no proxies.
    """
    config.validate()
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    own_client = client is None
    if client is None:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.request_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            headers=headers,
            trust_env=False,
        )
    elif headers:
        client.headers.update(headers)
    started_at = time.time()
    try:
        run = _Run(config, client)
        tasks = await (run.open_loop() if config.rate is not None else run.closed_loop())
        await run.drain(tasks)
        elapsed = time.perf_counter() - run.t0
    finally:
        if own_client:
            await client.aclose()
    summary = summarize(run.records, elapsed, config.slo_ttft_ms, config.slo_tpot_ms)
    return LoadResult(config, run.records, summary, started_at, elapsed)


def _length_arg(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as exc:  # argparse would hide the message of a plain ValueError
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_names(args: argparse.Namespace) -> list[str]:
    if args.models:
        return [m.strip() for m in args.models.split(",") if m.strip()]
    if args.model_prefix and args.num_models:
        return [f"{args.model_prefix}-{i}" for i in range(args.num_models)]
    raise ValueError("give --models a,b,c or --model-prefix P --num-models N")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.loadgen",
        description="Load generator for OpenAI-compatible multi-adapter servers (loopback only).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (loopback)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g = p.add_argument_group("adapters")
    g.add_argument("--models", help="comma-separated adapter names (the request's `model`)")
    g.add_argument("--model-prefix", help="adapter names PREFIX-0 .. PREFIX-(N-1)")
    g.add_argument("--num-models", type=int, help="N for --model-prefix")
    g.add_argument("--adapter-dist", choices=ADAPTER_DISTS, default="uniform")
    g.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf skew; first model = rank 1")
    g = p.add_argument_group("load")
    g.add_argument("--rate", type=float, help="open loop: mean request rate (req/s; inf = burst)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    g.add_argument(
        "--concurrency",
        type=int,
        help="closed loop: concurrent clients (with --rate: cap on in-flight requests)",
    )
    g.add_argument("--num-requests", type=int, help="stop issuing after this many requests")
    g.add_argument("--duration", type=float, help="stop issuing after this many seconds")
    g.add_argument("--drain-timeout", type=float, default=60.0, help="wait for in-flight (s)")
    g.add_argument("--request-timeout", type=float, default=300.0, help="per request total (s)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("requests")
    lens = "N | uniform:LO:HI | normal:MEAN:STD[:MIN]"
    g.add_argument(
        "--prompt-len",
        type=_length_arg,
        default=LengthDist("fixed", 64),
        help=f"prompt length in words (~tokens): {lens}",
    )
    g.add_argument(
        "--output-len",
        type=_length_arg,
        default=LengthDist("fixed", 32),
        help=f"max_tokens per request: {lens}",
    )
    g.add_argument("--ignore-eos", action="store_true", help="send vLLM's ignore_eos: true")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into each body")
    g.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    g = p.add_argument_group("report")
    g.add_argument("--slo-ttft-ms", type=float, help="goodput SLO on time to first token")
    g.add_argument("--slo-tpot-ms", type=float, help="goodput SLO on time per output token")
    g.add_argument("--json", type=Path, help="write summary and per-request records here")
    g.add_argument("--plot", type=Path, help="write latency and throughput plots (PNG) here")
    g.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    return p


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    if not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    return LoadConfig(
        models=_model_names(args),
        url=args.url,
        endpoint=args.endpoint,
        rate=args.rate,
        burstiness=args.burstiness,
        concurrency=args.concurrency,
        adapter_dist=args.adapter_dist,
        zipf_alpha=args.zipf_alpha,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        num_requests=args.num_requests,
        duration_s=args.duration,
        drain_timeout_s=args.drain_timeout,
        request_timeout_s=args.request_timeout,
        seed=args.seed,
        api_key=args.api_key,
        extra_body=args.extra_body,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    bound = " and ".join(
        b
        for b in (
            f"{config.num_requests} requests" if config.num_requests else "",
            f"{config.duration_s:g} s" if config.duration_s else "",
        )
        if b
    )
    load = f"rate {config.rate:g} req/s" if config.rate is not None else ""
    if config.concurrency is not None:
        load += (", " if load else "") + f"concurrency {config.concurrency}"
    print(
        f"{config.mode} load on {endpoint_url(config.url, config.endpoint)}: {load}, up to "
        f"{bound}; {len(config.models)} adapters ({config.adapter_dist})",
        file=sys.stderr,
    )
    result = asyncio.run(run_load(config))
    print(format_summary(result.summary))
    if args.json:
        result.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        result.write_plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if result.summary.num_ok == 0 or (args.fail_on_error and result.summary.num_errors):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
