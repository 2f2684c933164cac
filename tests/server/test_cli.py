"""The command line: flags, sizes, defaults, the `adapters` dispatch, and `python -m server` as a
real process that drains on SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from server import cli
from tests.server.conftest import FIXTURE, PROMPTS, copy_adapters, greedy, token_ids, wait_healthy

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "expected"), [
    ("1048576", 1 << 20), ("2GiB", 2 << 30), ("512MiB", 512 << 20), ("512mib", 512 << 20),
    ("1G", 10**9), ("1GB", 10**9), ("1.5Gi", 3 << 29), ("64KiB", 64 << 10), ("10k", 10_000),
    ("7B", 7),
])
def test_parse_size(text: str, expected: int) -> None:
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "-1G", "1XB", "1 2", "0", "1e9"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(Exception, match="size"):
        cli.parse_size(text)


def test_help_explains_every_flag() -> None:
    text = cli.build_parser().format_help()
    for flag in ("--adapter-dir", "--adapter ", "--served-model-name", "--host", "--port",
                 "--api-key", "--max-loras", "--max-cpu-adapters", "--max-lora-rank",
                 "--max-gpu-adapter-memory",
                 "--max-num-seqs", "--max-model-len", "--kv-cache-memory",
                 "--max-queued-requests", "--dtype", "--device", "--merge-static",
                 "--no-merge-static",
                 "--no-pack-weights",
                 "--shutdown-timeout", "--allowed-adapter-root", "MODEL_DIR"):
        assert flag in text, flag


def test_parsing(tmp_path: Path) -> None:
    x, y = tmp_path / "x", tmp_path / "y"
    x.mkdir(), y.mkdir()
    args = cli.build_parser().parse_args([
        "/m", "--adapter", f"a={x}", "--adapter", f"b.1={y}", "--api-key", "k1", "--api-key",
        "k2", "--kv-cache-memory", "2GiB", "--dtype", "bfloat16", "--max-queued-requests", "3",
        "--allowed-adapter-root", "/r1", "--allowed-adapter-root", "/r2"])
    assert args.model_dir == Path("/m")
    assert args.adapter == [("a", x), ("b.1", y)]
    assert args.api_key == ["k1", "k2"]
    assert args.kv_cache_memory == 2 << 30
    assert args.allowed_adapter_root == [Path("/r1"), Path("/r2")]
    defaults = cli.build_parser().parse_args([])
    assert (defaults.model_dir, defaults.host, defaults.port) == (None, "127.0.0.1", 8000)
    assert defaults.kv_cache_memory == 1 << 30 and defaults.max_queued_requests is None
    assert defaults.merge_static is True  # merged by default: exact, and faster for GOAT
    assert cli.build_parser().parse_args(["--no-merge-static"]).merge_static is False
    assert cli.build_parser().parse_args(["--merge-static"]).merge_static is True
    for bad in (["--adapter", "no-equals"], ["--adapter", f"../x={x}"],
                ["--adapter", f"a={tmp_path / 'missing'}"], ["--adapter", "a=s3://b/a"],
                ["--max-loras", "0"],
                ["--dtype", "float16"], ["--kv-cache-memory", "lots"],
                ["--shutdown-timeout", "-1"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)


def test_gpu_adapter_memory_flag() -> None:
    """--max-gpu-adapter-memory takes sizes; without it (and without --max-loras) the
    accelerator has 8 slots, with it the bytes decide up to --max-cpu-adapters, and --max-loras
    bounds the count either way; vLLM's engine has no byte-sized pool."""
    from goat_runtime.engine.config import EngineConfig

    args = cli.build_parser().parse_args(["/m", "--max-gpu-adapter-memory", "2GiB"])
    assert args.max_gpu_adapter_memory == 2 << 30 and args.max_loras is None
    assert cli.build_parser().parse_args([]).max_gpu_adapter_memory is None
    base = FIXTURE / "base"
    config = cli._engine_config(cli.build_parser().parse_args(
        [str(base), "--max-gpu-adapter-memory", "3MiB", "--max-loras", "5"]))
    assert (config.max_gpu_adapter_memory, config.max_loras) == (3 << 20, 5)
    assert EngineConfig(model_dir=base).max_device_slots == 8
    assert EngineConfig(model_dir=base, max_gpu_adapter_memory=1 << 30,
                        max_cpu_adapters=100).max_device_slots == 100
    assert EngineConfig(model_dir=base, max_gpu_adapter_memory=1 << 30,
                        max_loras=3).max_device_slots == 3
    with pytest.raises(ValueError, match="max_gpu_adapter_memory"):
        EngineConfig(model_dir=base, max_gpu_adapter_memory=0)
    with pytest.raises(SystemExit):
        cli.main([str(base), "--engine", "vllm", "--max-gpu-adapter-memory", "1GiB"])


def test_adapters_subcommand_dispatches_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    import server.adapters_cli as tools

    seen = []
    monkeypatch.setattr(tools, "main", lambda argv: seen.append(argv) or 3)
    assert cli.main(["adapters", "inspect", "/some/adapter", "--json"]) == 3
    assert seen == [["inspect", "/some/adapter", "--json"]]


class _Stop(Exception):
    pass


def test_default_model_and_demo_adapters(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without MODEL_DIR: the embedded default model and the repository's adapters/."""
    import goat_runtime.default_model as default_model
    import goat_runtime.engine.async_engine as async_engine

    captured = {}

    class Recorder:
        def __init__(self, config, listener=None):
            captured["config"], captured["listener"] = config, listener
            raise _Stop

    monkeypatch.setattr(default_model, "default_model_dir", lambda: FIXTURE / "base")
    monkeypatch.setattr(async_engine, "AsyncEngine", Recorder)
    with pytest.raises(_Stop):
        cli.main(["--max-loras", "2", "--adapter", f"pinned={FIXTURE / 'adapters' / 'goat0'}"])
    config = captured["config"]
    assert config.model_dir == FIXTURE / "base" and config.base_name == "base"
    assert config.adapter_dir == REPO / "adapters"
    assert config.adapters == {"pinned": FIXTURE / "adapters" / "goat0"}
    assert config.max_loras == 2
    assert captured["listener"] is not None  # the metrics listen to the engine
    with pytest.raises(_Stop):
        cli.main([str(FIXTURE / "base"), "--served-model-name", "tiny"])
    assert captured["config"].adapter_dir is None  # an explicit model: no demo adapters
    assert captured["config"].base_name == "tiny"
    with pytest.raises(SystemExit, match="max_cpu_adapters"):
        cli.main([str(FIXTURE / "base"), "--max-loras", "8", "--max-cpu-adapters", "2"])


@pytest.mark.parametrize(("folder", "engine", "message"), [
    ("typo", "goat", "argument --adapter-dir: adapter folder {value!r} does not exist"),
    ("gs://bucket/adapters", "goat", "argument --adapter-dir: adapter location {value!r}: "
                                     "unsupported scheme gs://; use a local folder, "
                                     "s3://bucket/prefix or hf://org/repo[@revision]"),
    ("s3://bucket/adapters", "vllm", "--engine vllm serves local adapter folders only (not "
                                     "s3:// or hf://)"),
    ("a-file", "goat", "argument --adapter-dir: adapter folder {value!r} is not a folder"),
])
@pytest.mark.slow
def test_adapter_dir_that_cannot_be_served_stops_start_up(
        tmp_path: Path, folder: str, engine: str, message: str) -> None:
    """A typo or an unsupported URL in --adapter-dir used to serve the base alone without a
    word: the process stops while parsing its flags (before any model loads, and for --engine
    vllm before it re-executes in the vLLM environment), with one line naming the folder."""
    (tmp_path / "a-file").write_text("")
    value = folder if "://" in folder else str(tmp_path / folder)
    proc = subprocess.run(
        [sys.executable, "-m", "server", str(FIXTURE / "base"), "--adapter-dir", value,
         "--engine", engine, "--device", "cpu"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "goat-serve: error: " + message.format(
        value=value)


def test_engine_config_refuses_a_missing_adapter_dir(tmp_path: Path) -> None:
    """Both engines are built from EngineConfig, which makes the same check for callers that
    do not go through the command line."""
    from goat_runtime.engine.config import EngineConfig

    with pytest.raises(ValueError, match=r"adapter folder .*nope' does not exist"):
        EngineConfig(model_dir=FIXTURE / "base", adapter_dir=tmp_path / "nope")
    assert EngineConfig(model_dir=FIXTURE / "base", adapter_dir=tmp_path).adapter_dir == tmp_path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_python_m_server_drains_on_sigterm(tmp_path: Path) -> None:
    """A real process: serves, then on SIGTERM finishes what fits in --shutdown-timeout, aborts
    the rest (its stream ends with an error event), refuses new work and exits."""
    port = _free_port()
    adapter_dir = copy_adapters(tmp_path / "adapters")
    env = os.environ | {"GOAT_CACHE_DIR": str(tmp_path / "cache"), "GOAT_SERVE_API_KEY": "k"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", str(FIXTURE / "base"), "--adapter-dir",
         str(adapter_dir), "--port", str(port), "--dtype", "float32", "--device", "cpu",
         "--kv-cache-memory", "32MiB", "--shutdown-timeout", "0.5", "--log-level", "warning"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer k"}
    try:
        wait_healthy(proc, url)
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            quick = http.post("/v1/completions", json={
                "model": "goat0", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0,
                "ignore_eos": True})
            assert token_ids(quick.json()["choices"][0]["text"]) == greedy("goat0", 0)
            # 16 x 500 tokens take 1.8-2.7 s here, several times the 0.5 s drain (n=8 took 1.2 s:
            # a fast run finished inside a 1 s drain and ended without the abort).
            body = {"model": "goat1", "prompt": PROMPTS[0], "max_tokens": 500, "n": 16,
                    "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                assert next(lines).startswith("data: ")
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                events = [line[len("data: "):] for line in lines if line]
            elapsed = time.monotonic() - sent
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "aborted" and "shutting down" in error["message"]
        assert 0.4 < elapsed < 10
        proc.wait(timeout=30)
        assert proc.returncode in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pinned_adapter_problems_are_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--adapter NAME=PATH: a missing folder is refused while parsing; a folder that is not an
    adapter stops start-up with the loader's message, not a traceback."""
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--adapter", f"a={tmp_path / 'missing'}"])
    assert (f"argument --adapter: adapter folder {str(tmp_path / 'missing')!r} does not exist"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit, match=r"goat-serve: error: .*missing adapter_config\.json"):
        cli.main([str(FIXTURE / "base"), "--adapter", f"a={tmp_path}", "--device", "cpu",
                  "--kv-cache-memory", "8MiB"])


def test_tool_and_structured_output_flags(tmp_path: Path) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text("{{ messages[0].content }}")
    args = cli.build_parser().parse_args(["--chat-template", str(template),
                                          "--grammar-compile-timeout", "2.5"])
    assert args.chat_template == "{{ messages[0].content }}"  # the file's text
    assert args.grammar_compile_timeout == 2.5 and args.tool_call_parser == "hermes"
    defaults = cli.build_parser().parse_args([])
    assert defaults.chat_template is None and defaults.grammar_compile_timeout == 10.0
    for bad in (["--chat-template", str(tmp_path / "missing.jinja")],
                ["--tool-call-parser", "llama3"], ["--grammar-compile-timeout", "-1"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)
