"""The soak test's verdicts and checks (pure functions of its samples and request results,
unit-tested with synthetic ones), and its CSV, plot and tables. The traffic is in soak.py."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from loadtests.common import format_table
from loadtests.stream import Outcome

CLIENT_KINDS = {"stream": 3, "stream_chat": 2, "completion": 2, "chat": 1, "n3": 1,
                "echo_logprobs": 1, "disconnect": 2}  # the clients' request kinds, weighted
EXPECTED_ERRORS = {"after_unload": {404}, "dyn_request": {404}, "load_corrupt": {400},
                   "request_corrupt": {400}}  # clear errors a kind may (or must) get
ADMIN_KINDS = {"load", "unload", "load_corrupt"}  # not generation: no queue limit applies
WANTED = {**{k: "ok" for k in CLIENT_KINDS}, "disconnect": "disconnected", "load": "ok",
          "dyn_request": "ok", "unload": "ok", "after_unload": "expected_error",
          "load_corrupt": "expected_error", "request_corrupt": "expected_error",
          "burst": "refused"}  # each kind must be seen at least once with this outcome

@dataclass
class Sample:
    t: float  # seconds since the start of the warm-up
    phase: str  # warmup, baseline, traffic, drain, end
    rss_mb: float
    fds: int
    threads: int
    kv_blocks: int | None  # None: /metrics did not answer
    kv_usage: float | None
    running: int | None
    waiting: int | None
    requests: int  # requests finished so far


@dataclass
class Result:
    kind: str
    model: str
    t: float
    verdict: str  # ok, refused (429), expected_error, disconnected, failure
    status: int | None = None
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# ---- analysis (pure functions of the samples and results) -------------------------------------


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of ys over xs and its standard error (inf with fewer than 3 points or
    one x)."""
    n = len(xs)
    if n < 2:
        return 0.0, math.inf
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, math.inf
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if n < 3:
        return slope, math.inf
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys, strict=True))
    return slope, math.sqrt(residual / (n - 2) / sxx)


def phase(samples: Sequence[Sample], name: str) -> list[Sample]:
    return [s for s in samples if s.phase == name]


def rss_trend(samples: Sequence[Sample], max_slope: float) -> Check:
    """RSS (MB) fitted by least squares against time (min) over the second half of the traffic
    phase: it fails if slope - 2 standard errors > max_slope, i.e. when the samples show, with
    about 95% confidence, growth faster than `max_slope` MB/min. The first half is left out: the
    allocator's pools may still grow there. 1 MB/min is 1.4 GB a day, a leak that takes a server
    down within days; a 20-minute run at 5 s samples resolves slopes well below it (the standard
    error is printed), a short run only proves a steeper one."""
    traffic = phase(samples, "traffic")
    if len(traffic) < 4:
        return Check("RSS trend", False, f"{len(traffic)} traffic samples; at least 4 needed")
    mid = (traffic[0].t + traffic[-1].t) / 2
    half = [s for s in traffic if s.t >= mid]
    slope, se = linear_fit([s.t / 60 for s in half], [s.rss_mb for s in half])
    ok = slope - 2 * se <= max_slope
    return Check("RSS trend", ok, f"slope {slope:+.2f} +- {se:.2f} MB/min over the last "
                 f"{len(half)} traffic samples; limit: slope - 2 SE <= {max_slope:g}")


def rss_return(samples: Sequence[Sample], tolerance: float) -> Check:
    """The median RSS of the idle samples at the end at most `tolerance` above the median of the
    idle samples after the warm-up (a drop is no leak)."""
    base, end = phase(samples, "baseline"), phase(samples, "end")
    if not base or not end:
        return Check("RSS back to baseline", False, "no baseline or end samples")
    b = statistics.median(s.rss_mb for s in base)
    e = statistics.median(s.rss_mb for s in end)
    return Check("RSS back to baseline", e <= b * (1 + tolerance),
                 f"{b:.1f} MB after warm-up, {e:.1f} MB at the end ({e / b - 1:+.1%}; "
                 f"limit +{tolerance:.0%})")


def kv_return(samples: Sequence[Sample]) -> Check:
    end = phase(samples, "end")
    used = [s.kv_blocks for s in end]
    ok = bool(end) and all(b == 0 for b in used)
    return Check("KV blocks back to 0", ok, f"blocks in use at the end: {used or 'no samples'}")


def no_growth(samples: Sequence[Sample], attr: str) -> Check:
    """`attr` (fds, threads) at the end no higher than its peak before the middle of the traffic
    (warm-up included): thread pools and connection pools grow on demand up to a cap, and reach
    it early; a leak keeps growing past it."""
    traffic, end = phase(samples, "traffic"), phase(samples, "end")
    if not traffic or not end:
        return Check(f"{attr} not leaking", False, "no traffic or end samples")
    mid = (traffic[0].t + traffic[-1].t) / 2
    peak = max(getattr(s, attr) for s in samples if s.t <= mid)
    last = getattr(end[-1], attr)
    base = [getattr(s, attr) for s in phase(samples, "baseline")]
    return Check(f"{attr} not leaking", last <= peak,
                 f"after warm-up {max(base) if base else '-'}, peak until mid-traffic {peak}, "
                 f"end {last}")


def request_checks(results: Sequence[Result]) -> list[Check]:
    failures = [r for r in results if r.verdict == "failure"]
    lines = [f"{r.kind} ({r.model}) at {r.t:.1f} s: {r.status} {r.detail}" for r in failures[:10]]
    seen = {(r.kind, r.verdict) for r in results}
    missing = [f"{k} -> {v}" for k, v in WANTED.items() if (k, v) not in seen]
    return [
        Check("every request ended as it should", not failures,
              f"{len(failures)} failures of {len(results)}" + "".join(f"\n  {x}" for x in lines)),
        Check("every kind seen with its expected outcome", not missing,
              "missing: " + ", ".join(missing) if missing else f"{len(WANTED)} kinds"),
    ]


def log_check(log_text: str) -> Check:
    bad = [line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line]
    return Check("server log clean", not bad, f"{len(bad)} ERROR/Traceback lines"
                 + "".join(f"\n  {line[:300]}" for line in bad[:5]))


def evaluate(samples: Sequence[Sample], results: Sequence[Result], log_text: str,
             healthy: bool, rss_tolerance: float, max_rss_slope: float) -> list[Check]:
    return [*request_checks(results), log_check(log_text),
            Check("/health at the end", healthy, "200" if healthy else "not 200"),
            kv_return(samples), rss_return(samples, rss_tolerance),
            rss_trend(samples, max_rss_slope), no_growth(samples, "fds"),
            no_growth(samples, "threads")]


# ---- verdicts of single requests --------------------------------------------------------------


def error_message(text: str) -> str | None:
    """The message of an OpenAI-shaped error body, None if the body is not one."""
    try:
        err = json.loads(text)["error"]
        message = err["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) and message and "type" in err else None


def http_verdict(kind: str, status: int, text: str, retry_after: str | None) -> tuple[str, str]:
    """(verdict, detail) of an answer that is not a 200."""
    message = error_message(text)
    if message is None:
        return "failure", f"HTTP {status}, not an OpenAI-shaped error: {text[:200]!r}"
    if status == 429 and kind not in ADMIN_KINDS:
        return ("refused", message) if retry_after else ("failure", "429 without Retry-After")
    if status in EXPECTED_ERRORS.get(kind, ()):
        return "expected_error", message
    return "failure", f"HTTP {status}: {message}"


def body_problem(kind: str, text: str, n: int, prompt: str) -> str | None:
    """What is wrong with a 200 answer of a plain (not streamed) request, or None."""
    try:
        data = json.loads(text)
        choices, usage = data["choices"], data["usage"]
    except (ValueError, KeyError, TypeError):
        return f"a 200 without choices and usage: {text[:200]!r}"
    if len(choices) != n:
        return f"{len(choices)} choices, {n} asked for"
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return f"finish_reasons {[c.get('finish_reason') for c in choices]}"
    if kind == "chat" and not isinstance(choices[0].get("message", {}).get("content"), str):
        return "a chat answer without message content"
    if kind == "echo_logprobs":
        if not choices[0]["text"].startswith(prompt):
            return "echo: the text does not start with the prompt"
        tokens = (choices[0].get("logprobs") or {}).get("tokens") or []
        want = usage["prompt_tokens"] + usage["completion_tokens"]
        if len(tokens) != want:
            return f"echo logprobs for {len(tokens)} tokens, prompt + completion = {want}"
    return None


def outcome_result(kind: str, t: float, out: Outcome) -> Result:
    """A streamed completion (stream.stream_request) as a Result."""
    r = Result(kind, out.adapter, t, "ok", out.status, seconds=out.end_s or 0.0)
    v = out.verdict
    if v == "disconnected":
        r.verdict = "disconnected"
    elif v.startswith("refused_"):
        r.verdict, r.detail = http_verdict(kind, out.status or 0, out.error_body or "",
                                           out.retry_after)
    elif v == "error_event":
        r.verdict, r.detail = "failure", f"error event in the stream: {out.error_event}"
    elif v != "complete":  # transport or lost
        r.verdict, r.detail = "failure", out.exception or "stream cut: no finish_reason or [DONE]"
    return r


# ---- output -------------------------------------------------------------------------------------


def write_csv(samples: Sequence[Sample], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(Sample)])
        writer.writerows([getattr(s, f.name) for f in fields(Sample)] for s in samples)


def write_plot(samples: Sequence[Sample], rss_tolerance: float, path: Path) -> None:
    """RSS, KV blocks, fds and threads against time; phases shaded, the baseline's tolerance
    band and the fitted trend over the second half of the traffic on the RSS panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(10, 9), sharex=True)
    t = [s.t / 60 for s in samples]
    for ax, attr, label in zip(axes, ("rss_mb", "kv_blocks", "fds", "threads"),
                               ("RSS (MB)", "KV blocks in use", "open fds", "threads"),
                               strict=True):
        ax.plot(t, [getattr(s, attr) if getattr(s, attr) is not None else math.nan
                    for s in samples], lw=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        for name, color in (("warmup", "tab:orange"), ("drain", "tab:red")):
            ts = [s.t / 60 for s in phase(samples, name)]
            if ts:
                ax.axvspan(min(ts), max(ts), color=color, alpha=0.1)
    base = phase(samples, "baseline")
    if base:
        b = statistics.median(s.rss_mb for s in base)
        axes[0].axhline(b, color="k", lw=0.8, ls="--", label="after warm-up")
        axes[0].axhspan(b, b * (1 + rss_tolerance), color="tab:green", alpha=0.15,
                        label=f"+{rss_tolerance:.0%}")
    traffic = phase(samples, "traffic")
    if len(traffic) >= 4:
        mid = (traffic[0].t + traffic[-1].t) / 2
        half = [s for s in traffic if s.t >= mid]
        xs = [s.t / 60 for s in half]
        slope, _ = linear_fit(xs, [s.rss_mb for s in half])
        my, mx = statistics.fmean(s.rss_mb for s in half), statistics.fmean(xs)
        axes[0].plot([xs[0], xs[-1]], [my + slope * (xs[0] - mx), my + slope * (xs[-1] - mx)],
                     color="tab:red", lw=2, label=f"trend {slope:+.2f} MB/min")
    axes[0].legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("minutes (orange: warm-up, red: drain)")
    fig.suptitle("goat-serve soak")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figures(samples: Sequence[Sample], results: Sequence[Result]) -> str:
    def med(name: str, attr: str) -> str:
        values = [getattr(s, attr) for s in phase(samples, name) if getattr(s, attr) is not None]
        return f"{statistics.median(values):g}" if values else "-"

    def peak(attr: str) -> str:
        values = [getattr(s, attr) for s in samples if getattr(s, attr) is not None]
        return f"{max(values):g}" if values else "-"

    rows = [[attr, med("baseline", attr), peak(attr), med("end", attr)]
            for attr in ("rss_mb", "kv_blocks", "fds", "threads")]
    table = format_table(["resource", "after warm-up (median)", "peak", "end (median)"], rows)
    counts = Counter((r.kind, r.verdict) for r in results)
    verdicts = ["ok", "disconnected", "refused", "expected_error", "failure"]
    kinds = sorted({r.kind for r in results})
    by_kind = format_table(["kind", *verdicts],
                           [[k, *(counts.get((k, v), 0) for v in verdicts)] for k in kinds]
                           + [["all", *(sum(counts.get((k, v), 0) for k in kinds)
                                        for v in verdicts)]])
    return f"{table}\n\n{by_kind}"


def write_outputs(out: Path, samples: Sequence[Sample], results: Sequence[Result],
                  checks: Sequence[Check], rss_tolerance: float, header: str,
                  record: dict[str, Any]) -> str:
    """soak.csv, soak.png and soak.json (`record`, the checks and every request) in `out`;
    returns the report: `header`, the figures, the checks and where the files are."""
    write_csv(samples, out / "soak.csv")
    write_plot(samples, rss_tolerance, out / "soak.png")
    (out / "soak.json").write_text(json.dumps({
        **record, "checks": [asdict(c) for c in checks],
        "results": [asdict(r) for r in results]}, indent=1))
    table = format_table(["check", "passed", "detail"],
                         [[c.name, "yes" if c.ok else "NO", c.detail.replace("\n", " |")]
                          for c in checks])
    return "\n".join([header, "", figures(samples, results), "", table, "",
                      f"Samples: {out / 'soak.csv'}; plot: {out / 'soak.png'}; requests and "
                      f"checks: {out / 'soak.json'}"])
