"""Runs in the vLLM virtual environment (see conftest.py): starts one vLLM engine with the goat
plugin and writes what the tests compare with the fixture's reference to a safetensors file.

    python -m tests.vllm.driver SCENARIO OUT.safetensors    (from the repository root)

Scenarios: "main" (max_loras 3: each adapter alone, then all adapters and the base mixed in one
batch, then a corrupt and a too-large adapter each in a batch (refused), then the mixed batch
again), "max_loras1" (one slot: base requests beside adapter requests), "tp2" (tensor parallel
2, the mixed batch), "merged" and "merged_tp2" (the GOAT static components merged into the
base weights by GOAT_VLLM_MERGE_STATIC: each alone, then mixed; at tensor parallel 2, mixed),
"bf16_router" (served in bfloat16: the two adapters of `router_adapters.py`, each alone).
Keys: {run}/{name}/{i}/greedy [12] and {run}/{name}/{i}/prompt_logprobs [len - 1, vocab]
(dense: every token's logprob at every prompt position after the first).
"""

import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.vllm.bad_adapters import make_bad_adapters
from tests.vllm.router_adapters import make_router_adapters

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures",
                       "goat-peft-tiny")
ADAPTERS = ("goat0", "goat1", "lora0")
VOCAB = 320


def set_environment(scenario: str) -> None:
    os.environ["VLLM_PLUGINS"] = "goat"
    if scenario.startswith("merged"):  # the fixture's GOAT adapters share one signature
        os.environ["GOAT_VLLM_MERGE_STATIC"] = os.path.join(FIXTURE, "adapters")
    if scenario.endswith("tp2"):
        # vLLM's CPU workers bind one NUMA node each by default; a one-node test machine
        # needs an explicit core per rank.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")


def main() -> None:
    scenario, out_path = sys.argv[1], sys.argv[2]
    set_environment(scenario)
    merged = scenario.startswith("merged")
    import torch
    from safetensors.torch import load_file, save_file
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    ref = load_file(os.path.join(FIXTURE, "reference_outputs.safetensors"))
    inputs = [ref[f"input_{i}"].tolist() for i in range(3)]
    lora = {name: LoRARequest(name, k + 1, os.path.join(FIXTURE, "adapters", name))
            for k, name in enumerate(ADAPTERS)}
    if scenario == "bf16_router":
        made = make_router_adapters(Path(tempfile.mkdtemp(prefix="goat-router-")))
        for k, (name, path) in enumerate(made.items()):
            lora[name] = LoRARequest(name, 20 + k, str(path))
    start = time.time()
    llm = LLM(model=os.path.join(FIXTURE, "base"),
              dtype="bfloat16" if scenario == "bf16_router" else "float32", enforce_eager=True,
              max_model_len=64, enable_lora=True,
              max_loras=1 if scenario == "max_loras1" else 3,
              # merged, a GOAT slot needs E + r = 12 rows, unmerged E + r + r = 20
              max_lora_rank=16 if merged else 32,
              max_num_seqs=16, max_num_batched_tokens=512, kv_cache_memory_bytes=32 << 20,
              max_logprobs=VOCAB, seed=0,
              tensor_parallel_size=2 if scenario.endswith("tp2") else 1)
    print(f"engine started in {time.time() - start:.1f}s", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            prompt_logprobs=VOCAB)
    results: dict[str, torch.Tensor] = {}

    run = functools.partial(run_batch, llm, params, inputs, lora, results)
    if scenario == "main":
        run_main(run, lora, results)
    elif scenario == "max_loras1":
        for name in ADAPTERS:
            run(f"beside_{name}", [("base", 1), (name, 1), ("base", 2), (name, 0)])
    elif scenario in ("tp2", "merged_tp2"):
        run("mixed", [(name, i) for i in range(3) for name in ("base", *ADAPTERS)])
    elif scenario == "bf16_router":
        for name in ("router_fine", "router_exact"):  # alike batches: alike bf16 arithmetic
            run("bf16", [(name, i) for i in range(3)])
    elif scenario == "merged":
        for name in (*ADAPTERS, "base"):  # base last: after adapter steps, undone all alone
            run("alone", [(name, i) for i in range(3)])
        run("mixed", [(name, i) for i in range(3) for name in ("base", *ADAPTERS)])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    save_file({k: v.contiguous() for k, v in results.items()}, out_path)
    print(f"done in {time.time() - start:.1f}s", flush=True)


def run_batch(llm: Any, params: Any, inputs: list[list[int]], lora: dict[str, Any],
              results: dict[str, Any], tag: str, batch: list[tuple[str, int]]) -> None:
    """One generate call: every request is submitted before the engine steps."""
    import torch

    outs = llm.generate([{"prompt_token_ids": inputs[i]} for _, i in batch], params,
                        lora_request=[lora.get(name) for name, _ in batch], use_tqdm=False)
    for (name, i), out in zip(batch, outs, strict=True):
        results[f"{tag}/{name}/{i}/greedy"] = torch.tensor(out.outputs[0].token_ids)
        dense = torch.full((len(inputs[i]) - 1, VOCAB), float("nan"))
        for pos, entry in enumerate(out.prompt_logprobs[1:]):
            for token, logprob in entry.items():
                dense[pos, token] = logprob.logprob
        results[f"{tag}/{name}/{i}/prompt_logprobs"] = dense


def run_main(run: Callable[[str, list[tuple[str, int]]], None], lora: dict[str, Any],
             results: dict[str, Any]) -> None:
    """The "main" scenario, with `run` and the LoRA requests of main()."""
    import torch
    from vllm.lora.request import LoRARequest

    for name in ("base", *ADAPTERS):
        run("alone", [(name, i) for i in range(3)])
    run("mixed", [(name, i) for i in range(3) for name in ("base", *ADAPTERS)])
    # Bad adapters fail their own generate call with the reason; the engine keeps serving.
    bad = make_bad_adapters(Path(tempfile.mkdtemp(prefix="goat-bad-")))
    for k, name in enumerate(("corrupt", "too_large")):
        lora[name] = LoRARequest(name, 10 + k, str(bad[name]))
        try:
            run(f"bad_{name}", [("goat0", 0), (name, 1), ("base", 2)])
        except ValueError as exc:
            results[f"refused/{name}"] = torch.tensor([1])
            print(f"refused {name}: {exc}", flush=True)
    run("after_bad", [(name, i) for i in range(3) for name in ("base", *ADAPTERS)])


if __name__ == "__main__":
    main()
