"""Shared pieces of the load-test scripts: server subprocesses, a random model and adapters,
/metrics scraping, the machine description and a plain-text table.

Servers are started in their own process group (`start_new_session`), so stopping one also
stops the worker processes it spawned (vLLM's engine core), and only those.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from benchmarks.random_model import write_random_model
from goat_runtime.adapters.binding import base_linear_shapes
from loadtests.workload import WORDS

REPO = Path(__file__).resolve().parents[1]

PYTHON = Path(sys.executable)  # the interpreter running the scripts (the repo venv)
# Work directories, results and vLLM's virtual environment of the load-test scripts.
CACHE = Path(os.environ.get("GOAT_CACHE_DIR", Path.home() / ".cache" / "goat-serve"))
BASE_NAME = "smollm2-135m-random"  # the served name of the base model, on every server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A server subprocess (goat-serve or vLLM) with its output in `log_path`.

    Use as a context manager, or call `start()`, `wait_healthy()` and `stop()`.
    """

    name: str
    cmd: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    cwd: Path = REPO
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._log.write((" ".join(self.cmd) + "\n").encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=self.cwd,
            env={**os.environ, **self.env},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout_s: float = 300.0, path: str = "/health") -> float:
        """Poll `path` until it answers 200; returns the seconds it took. Raises RuntimeError
        (with the end of the server's log) if the process exits or the timeout passes."""
        start = time.monotonic()
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    raise RuntimeError(
                        f"{self.name} exited with code {code} before it was healthy; log "
                        f"{self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    if client.get(self.url + path).status_code == 200:
                        return time.monotonic() - start
                except httpx.HTTPError:
                    pass
                if time.monotonic() - start > timeout_s:
                    raise RuntimeError(
                        f"{self.name} not healthy after {timeout_s:g} s; log {self.log_path}:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.5)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL it after `timeout_s`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with _suppress_lookup():
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with _suppress_lookup():
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with _suppress_lookup():  # workers left behind by a server that exited on its own
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def process_group(self) -> int:
        """The server's process group (its own session: it and every worker it starts)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the live processes of the server's group."""
        if self.proc is None:
            return 0.0
        return group_cpu_seconds(self.proc.pid)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group `pgid` (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid:  # field 5 of stat: the process group
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


@dataclass(frozen=True)
class ProcSample:
    """One reading of a process's resources from /proc."""

    rss_bytes: int  # resident set size (VmRSS)
    fds: int  # open file descriptors (entries of /proc/PID/fd)
    threads: int


def proc_sample(pid: int) -> ProcSample:
    """RSS, open file descriptors and threads of process `pid` (Linux /proc). Raises OSError if
    the process is gone."""
    rss = threads = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            rss = int(value.split()[0]) * 1024  # "123456 kB"
        elif key == "Threads":
            threads = int(value)
    if rss is None or threads is None:  # a zombie has no VmRSS
        raise OSError(f"/proc/{pid}/status has no VmRSS or Threads: the process has exited")
    return ProcSample(rss, len(os.listdir(f"/proc/{pid}/fd")), threads)


class _suppress_lookup:
    """Ignore ProcessLookupError (the group is already gone)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> bool:
        return exc_type is not None and issubclass(exc_type, ProcessLookupError | PermissionError)


@dataclass
class GoatServeConfig:
    """The goat-serve command line (`python -m server ...`)."""

    model_dir: Path
    adapter_dir: Path | str | None = None  # a folder or an s3:// or hf:// URL
    port: int = 0  # 0: pick a free port
    served_model_name: str | None = None
    max_loras: int = 16
    max_cpu_adapters: int = 32
    max_num_seqs: int = 64
    max_queued_requests: int | None = None
    kv_cache_memory: str = "1GiB"
    merge_static: bool = True  # goat-serve's default; False adds --no-merge-static
    shutdown_timeout_s: float = 5.0
    log_level: str = "warning"
    extra_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = [str(PYTHON), "-m", "server", str(self.model_dir), "--port", str(self.port)]
        if self.adapter_dir is not None:
            cmd += ["--adapter-dir", str(self.adapter_dir)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        cmd += [
            "--max-loras", str(self.max_loras),
            "--max-cpu-adapters", str(self.max_cpu_adapters),
            "--max-num-seqs", str(self.max_num_seqs),
            "--kv-cache-memory", self.kv_cache_memory,
            "--shutdown-timeout", f"{self.shutdown_timeout_s:g}",
            "--log-level", self.log_level,
        ]
        if self.max_queued_requests is not None:
            cmd += ["--max-queued-requests", str(self.max_queued_requests)]
        if not self.merge_static:
            cmd.append("--no-merge-static")
        return cmd + list(self.extra_args)


def goat_serve(config: GoatServeConfig, log_path: Path, name: str = "goat-serve") -> ServerProcess:
    """A (not yet started) goat-serve subprocess for `config`, on a free port if port is 0."""
    if config.port == 0:
        config.port = free_port()
    env = {"PYTHONUNBUFFERED": "1"}
    return ServerProcess(name, config.command(), config.port, log_path, env=env)


# ---- model and adapters ----------------------------------------------------------------------


def write_random_smollm(model_dir: Path) -> Path:
    """A SmolLM2-135M-shaped Llama with random fp32 weights whose tokenizer has the load
    generator's prompt words as tokens (so prompts are distinct token sequences and no prefix
    cache skips a prefill). Reused if its tokenizer, written last, is already there."""
    if not (model_dir / "tokenizer.json").is_file():
        write_random_model(model_dir, words=WORDS)
    return model_dir


# ---- metrics -------------------------------------------------------------------------------


def scrape(url: str, timeout_s: float = 10.0) -> dict[str, float]:
    """GET url/metrics, as {'name{label="v",...}': value} (samples, labels sorted)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s, trust_env=False).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric_sum(samples: Mapping[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# ---- reporting -----------------------------------------------------------------------------


def machine_summary() -> str:
    """The CPU (lscpu's main lines), cores, memory and Python, in a few lines."""
    keep = (
        "Architecture", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
        "Socket(s)", "NUMA node(s)", "L2 cache", "L3 cache", "Flags",
    )
    lines: list[str] = []
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in keep:
            value = value.strip()
            if key == "Flags":  # only the vector extensions that matter for the kernels
                wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "fma")
                value = " ".join(f for f in value.split() if f in wanted)
            lines.append(f"{key}: {value}")
    try:
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        lines.append(f"Memory: {mem_kb / 2**20:.1f} GiB")
    except (OSError, ValueError, IndexError):
        pass
    lines.append(f"os.cpu_count(): {os.cpu_count()}; load average at start: {load_avg()}")
    lines.append(f"Python {platform.python_version()} on {platform.platform()}")
    return "\n".join(lines)


def load_avg() -> str:
    """The 1-, 5- and 15-minute load averages (other users of the machine show up here)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_busy(interval_s: float = 5.0) -> float:
    """The fraction of all CPUs busy over `interval_s` (from /proc/stat): with no server of ours
    running, that is what other jobs on the machine take."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    total0, idle0 = sample()
    time.sleep(interval_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_busy: float | None, timeout_s: float = 120.0) -> float | None:
    """Wait until other jobs use at most `max_busy` (0..1) of the CPUs over 10 s, or until the
    timeout; returns the last busy fraction (None if not asked to wait)."""
    if max_busy is None:
        return None
    deadline = time.monotonic() + timeout_s
    while True:
        busy = cpu_busy(10.0)
        if busy <= max_busy:
            return busy
        if time.monotonic() > deadline:
            print(f"CPUs still {busy:.0%} busy with other jobs after {timeout_s:g} s; going on",
                  file=sys.stderr, flush=True)
            return busy
        print(f"waiting: other jobs keep {busy:.0%} of the CPUs busy (load {load_avg()})",
              file=sys.stderr, flush=True)
        time.sleep(20)


def add_max_busy_arg(parser: argparse.ArgumentParser) -> None:
    """The scripts' --max-busy option, for `wait_for_quiet`."""
    parser.add_argument("--max-busy", type=float, default=None,
                        help="before each run, wait (up to 2 min) until other jobs use at most "
                             "this fraction (0-1) of the CPUs: they skew every figure on a "
                             "shared machine")


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table (also readable in a terminal); floats get 1-2 decimals."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"
        return str(value)

    body = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in body
    ]
    return "\n".join(lines)


def pct(stats: Any, q: int) -> float | None:
    """The q-th percentile of a loadgen LatencyStats, or None without data."""
    return stats.percentiles.get(f"p{q}") if stats.count else None


# ---- floors ----------------------------------------------------------------------------------


def decode_step_fixed_bytes(model_dir: Path, adapters: Sequence[Path], *, merged: bool) -> int:
    """The bytes every decode step of a case reads besides the KV cache (benchmarks/floors.py):
    the base weights and, per distinct adapter, its rows and its static term's rows (a GOAT
    adapter unmerged; on a merged server the undo term of the base and of LoRA adapters). A
    static term of signature rank r on a module has the size of an r-row LoRA pair there
    (C [r, d_in], D [d_out, r]), so it is counted from the adapter's own rows, no SVD needed.
    `merged`: the case's GOAT adapters share the merged signature (the default flags)."""
    from benchmarks.floors import adapter_bytes, base_weight_bytes
    from goat_runtime.adapters.format import load_adapter
    from goat_runtime.model.config import ModelConfig
    from goat_runtime.model.llama import LlamaForCausalLM

    probe = LlamaForCausalLM(ModelConfig.from_pretrained(model_dir), device="meta")
    total = base_weight_bytes(probe.fused_linears(), probe.lm_head)
    shapes = base_linear_shapes(model_dir)
    for path in adapters:
        adapter = load_adapter(path, shapes)
        goat = adapter.signature is not None
        terms = {m: (a.lora_a, a.lora_b) for m, a in adapter.layers.items()} \
            if goat and not merged else {}
        total += adapter_bytes(adapter.layers, terms, 4)
    return total
