"""Structured outputs under load (issue 19 item 5): goat-serve on SmolLM2-135M-Instruct (real
weights: JSON needs a real tokenizer) with 16 random GOAT adapters (r = 8, E = 8, k = 2, the
side-by-side's), 32 concurrent chat requests over the 16 adapters, half of them constrained by
a JSON schema and half free, against the same load with no constraint. The two loads alternate
within each round on one server; the figure is the median over rounds of the per-round ratio of
generated tokens per second. Also the grammar compile time of the schema, cold and cached.

    .venv/bin/python -m loadtests.structured               # 3 rounds (a few minutes)
    .venv/bin/python -m loadtests.structured --rounds 5 --max-tokens 96

A benchmark script, not a test: it takes minutes and all of the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from benchmarks.floors import format_ratio, median_of_ratios
from benchmarks.random_model import write_adapters
from goat_runtime.adapters.binding import base_linear_shapes
from loadtests.common import (
    CACHE,
    GoatServeConfig,
    goat_serve,
    load_avg,
    machine_summary,
)

SCHEMA = {  # a typical extraction schema
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "sentiment": {"enum": ["positive", "neutral", "negative"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["title", "tags", "sentiment", "score"],
    "additionalProperties": False,
}
TOPICS = ["a rainy holiday", "a new phone", "a football match", "a long train ride",
          "a noisy hotel", "a cooking class", "a job interview", "a mountain hike"]


def compile_times(model_dir: Path, repeats: int = 20) -> dict[str, float]:
    """Seconds: the tokenizer's grammar tables (once per engine), a cold compile of SCHEMA and
    a cached one (the median of `repeats`), through the engine's own Grammars."""
    from transformers import AutoTokenizer

    from goat_runtime.engine.sampling import Constraint
    from goat_runtime.engine.structured import Grammars

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    grammars = Grammars(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    start = time.perf_counter()
    grammars.compile(Constraint("regex", "x"))  # builds the tokenizer's tables
    tables = time.perf_counter() - start
    constraint = Constraint("json", json.dumps(SCHEMA))
    start = time.perf_counter()
    grammars.compile(constraint)
    cold = time.perf_counter() - start
    cached = []
    for _ in range(repeats):
        start = time.perf_counter()
        grammars.compile(constraint)
        cached.append(time.perf_counter() - start)
    grammars.shutdown()
    return {"tokenizer_tables_s": tables, "cold_s": cold, "cached_s": statistics.median(cached)}


async def one_load(url: str, models: Sequence[str], concurrency: int, max_tokens: int,
                   constrained: bool) -> tuple[float, int, int]:
    """`concurrency` requests at once (request i on adapter i mod 16; with `constrained`, the
    even ones carry the JSON schema). Returns (seconds, generated tokens, JSON answers that
    parse)."""
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        async def ask(i: int) -> tuple[int, bool]:
            body: dict = {"model": models[i % len(models)], "max_tokens": max_tokens,
                          "seed": i, "messages": [{"role": "user", "content": (
                              f"Review {TOPICS[i % len(TOPICS)]} as JSON.")}]}
            json_mode = constrained and i % 2 == 0
            if json_mode:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "review", "schema": SCHEMA, "strict": True}}
            response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            reply = response.json()
            parsed = False
            if json_mode and reply["choices"][0]["finish_reason"] == "stop":
                json.loads(reply["choices"][0]["message"]["content"])  # raises if invalid
                parsed = True
            return reply["usage"]["completion_tokens"], parsed

        start = time.perf_counter()
        results = await asyncio.gather(*(ask(i) for i in range(concurrency)))
        seconds = time.perf_counter() - start
    return seconds, sum(t for t, _ in results), sum(p for _, p in results)


def run(args: argparse.Namespace) -> str:
    from goat_runtime.default_model import default_model_dir

    model_dir = default_model_dir()
    work = args.work_dir
    names = [f"goat-{i}" for i in range(args.adapters)]
    write_adapters(work / "goat", base_linear_shapes(model_dir), names, "goat", seed=0)
    times = compile_times(model_dir)
    config = GoatServeConfig(model_dir, work / "goat", max_loras=args.adapters,
                             max_num_seqs=max(64, args.concurrency), kv_cache_memory="1GiB")
    rounds: list[dict[str, float]] = []
    lines = []
    with goat_serve(config, work / "structured-server.log") as server:
        server.wait_healthy(args.start_timeout)  # the first start computes GOAT's statics
        asyncio.run(one_load(server.url, names, len(names), 4, True))  # loads every adapter
        for r in range(args.rounds):
            figures: dict[str, float] = {}
            for key, constrained in (("free", False), ("mixed", True)):
                seconds, tokens, parsed = asyncio.run(one_load(
                    server.url, names, args.concurrency, args.max_tokens, constrained))
                figures[key] = tokens / seconds
                lines.append(f"round {r + 1} {key:>5}: {tokens} tokens in {seconds:.1f} s = "
                             f"{tokens / seconds:.1f} tok/s" + (
                                 f", {parsed} JSON answers complete and valid"
                                 if constrained else ""))
                print(lines[-1], file=sys.stderr, flush=True)
            rounds.append(figures)
    median, ratios = median_of_ratios(rounds, "mixed", "free")
    return "\n".join([
        machine_summary(), f"load average {load_avg()}",
        f"{args.concurrency} concurrent chat requests over {args.adapters} GOAT adapters, "
        f"max_tokens {args.max_tokens}; mixed: every other one with a JSON schema",
        *lines,
        f"throughput, mixed / free: {format_ratio(median, ratios)} (goal >= 0.85x)",
        f"grammar compile: tokenizer tables {times['tokenizer_tables_s'] * 1e3:.0f} ms once; "
        f"schema cold {times['cold_s'] * 1e3:.1f} ms, cached {times['cached_s'] * 1e6:.0f} us",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--start-timeout", type=float, default=1800.0)
    parser.add_argument("--work-dir", type=Path, default=CACHE / "bench-structured")
    print(run(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
