"""Peak memory of prompt logprobs: what `echo: true, logprobs: 5` on a long prompt adds to the
server's peak RSS.

One goat-serve on the default model (SmolLM2-135M-Instruct, vocabulary 49,152). The server first
answers the same long prompt without logprobs (so the peak already holds the prefill's own
activations), then with `echo: true, logprobs: 5`. The figure is the growth of the server's peak
RSS (VmHWM in /proc/PID/status) across the echo request; the goal is under 50 MB. Keeping the
prompt's logits whole would cost len(prompt) x 49,152 x 4 bytes (786 MB for 4,000 tokens).

    .venv/bin/python -m loadtests.echo_memory [--prompt-tokens 4000] [--logprobs 5]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import httpx

from goat_runtime.default_model import default_model_dir
from loadtests.common import GoatServeConfig, format_table, goat_serve, machine_summary

GOAL_MB = 50.0


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of a process's resident memory (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM line")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--logprobs", type=int, default=5)
    args = parser.parse_args()

    model_dir = default_model_dir()
    rng = random.Random(0)
    prompt = [rng.randrange(100, 49000) for _ in range(args.prompt_tokens)]
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": 1,
            "temperature": 0}
    with tempfile.TemporaryDirectory() as tmp:
        config = GoatServeConfig(model_dir, served_model_name="SmolLM2-135M-Instruct")
        server = goat_serve(config, Path(tmp) / "server.log")
        with server, httpx.Client(timeout=600, trust_env=False) as client:
            server.wait_healthy()
            pid = server.proc.pid if server.proc is not None else 0
            after_start = peak_rss_mb(pid)
            plain = client.post(server.url + "/v1/completions", json=body)
            plain.raise_for_status()
            after_plain = peak_rss_mb(pid)
            echo = client.post(server.url + "/v1/completions",
                               json={**body, "echo": True, "logprobs": args.logprobs})
            echo.raise_for_status()
            after_echo = peak_rss_mb(pid)
            entries = echo.json()["choices"][0]["logprobs"]["token_logprobs"]
            if len(entries) != args.prompt_tokens + 1:
                raise RuntimeError(f"expected {args.prompt_tokens + 1} token logprobs, got "
                                   f"{len(entries)}")
    growth = after_echo - after_plain
    print(machine_summary())
    print(format_table(
        ["peak RSS after", "MB"],
        [["start-up", f"{after_start:.1f}"],
         [f"{args.prompt_tokens}-token prompt, no logprobs", f"{after_plain:.1f}"],
         [f"same prompt, echo + logprobs {args.logprobs}", f"{after_echo:.1f}"]]))
    whole = args.prompt_tokens * 49152 * 4 / 2**20
    print(f"echo + logprobs raised the peak by {growth:.1f} MB (goal < {GOAL_MB:g} MB; the "
          f"prompt's whole logits would be {whole:.0f} MB): "
          f"{'PASS' if growth < GOAL_MB else 'FAIL'}")
    return 0 if growth < GOAL_MB else 1


if __name__ == "__main__":
    raise SystemExit(main())
