"""Where a decode step's time goes: its wall time, the device's busy time (kernels and copies),
the kernel launches and the python calls a step, over the running batch's decode steps.

On a GPU this tells a host-bound step (launches, dispatch) from a device-bound one: 1 minus the
busy share bounds what CUDA graphs could save. On the CPU only the wall time and the python
calls mean anything.

    PYTHONPATH=$PWD python3 -m benchmarks.decode_profile              # on the GPU machine
    python -m benchmarks.decode_profile --device cpu --quick          # rehearsal
"""

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampling import SamplingParams

# The kernel-launching calls torch's profiler records on the host, per launch.
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


@dataclass
class DecodeProfile:
    wall_ms: float  # one decode step, without a profiler attached
    busy_ms: float  # the device's kernels and copies in one step (0 on the CPU)
    launches: float  # kernel launches a step (0 on the CPU)
    python_calls: float  # python function calls a step (cProfile)
    ops_table: str  # torch's profiler, the ops by self CPU time

    def summary(self, device: str) -> str:
        if device != "cuda":
            return f"decode step {self.wall_ms:.2f} ms, {self.python_calls:,.0f} python calls"
        return (f"decode step {self.wall_ms:.2f} ms, GPU busy {self.busy_ms:.2f} ms "
                f"({self.busy_ms / self.wall_ms:.0%}), {self.launches:,.0f} launches, "
                f"{self.python_calls:,.0f} python calls")


def profile_decode(engine: LLMEngine, adapters: list[str | None], num_seqs: int, steps: int,
                   device: str) -> DecodeProfile:
    """Runs num_seqs requests (adapters round robin) through their prompts, then times `steps`
    decode steps three times: bare, under cProfile, under torch's profiler; then drains."""
    params = SamplingParams(temperature=0.0, max_tokens=3 * steps + 8, ignore_eos=True)
    for i in range(num_seqs):
        engine.add_request(f"p{i}", [5 + i % 50] * 16, params, adapters[i % len(adapters)])
    while engine.scheduler.waiting or any(s.is_prefill for s in engine.scheduler.running):
        engine.step()  # the prompts
    engine.step()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def decode() -> None:
        for _ in range(steps):
            engine.step()
        sync()

    sync()
    start = time.perf_counter()
    decode()
    wall = (time.perf_counter() - start) / steps
    calls = cProfile.Profile()
    calls.runcall(decode)
    python_calls = pstats.Stats(calls).total_calls / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        decode()
    events = prof.events()
    busy = sum(e.time_range.elapsed_us() for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.name in LAUNCH_EVENTS for e in events)
    while engine.has_work():
        engine.step()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20,
                                    max_name_column_width=50)
    return DecodeProfile(wall * 1e3, busy / 1e3 / steps, launches / steps, python_calls, ops)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.random_model import (
        NUM_ADAPTERS,
        TINY_SMOLLM2,
        write_goat_and_lora,
        write_random_model,
    )
    from goat_runtime.adapters.binding import base_linear_shapes
    from goat_runtime.engine.config import EngineConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a rehearsal)")
    parser.add_argument("--ops", action="store_true", help="also print torch's ops table")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu to rehearse)")
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        write_random_model(tmp / "model", TINY_SMOLLM2 if args.quick else None)
        goat, _ = write_goat_and_lora(tmp / "goat", tmp / "lora",
                                      base_linear_shapes(tmp / "model"))
        cases = {"base": ({}, [None]),
                 f"{NUM_ADAPTERS} GOAT, unmerged": (
                     {"adapter_dir": tmp / "goat", "merge_static": False}, goat)}
        for label, (extra, adapters) in cases.items():
            engine = LLMEngine(EngineConfig(
                model_dir=tmp / "model", device=args.device,
                dtype="bfloat16" if args.device == "cuda" else "float32",
                static_cache_dir=tmp / "static", max_loras=NUM_ADAPTERS,
                max_num_seqs=args.batch, kv_cache_memory=(64 << 20) if args.quick else (4 << 30),
                enable_prefix_caching=False, **extra))
            for name in adapters:
                if name is not None:
                    engine.adapters.request_load(name).result()
            result = profile_decode(engine, adapters, args.batch, args.steps, args.device)
            engine.adapters.shutdown()
            print(f"{label}, batch {args.batch}: {result.summary(args.device)}", flush=True)
            if args.ops:
                print(result.ops_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
