"""The device check: everything goat-serve should show on a lent GPU machine, in one run.

From a fresh checkout, with that machine's own python3 (no install: run with PYTHONPATH set to
the checkout; the C++ CPU kernels, goat_runtime._C, are neither built nor needed on CUDA):
  1. the environment (python, torch, triton, the device; modules missing there);
  2. the fixture's reference outputs through the native engine (greedy tokens, prompt logprobs),
     float32 (exact tokens) and bfloat16 (how many sequences keep the reference's tokens);
  3. the GPU tests (pytest: the tests parametrized over CUDA and the Triton kernels' tests);
  4. the routed op against plain LoRA (the same kernel with no router, and torch's gather + bmm
     shrink/expand) on one SmolLM2-135M layer's projections, 16 adapters;
  5. paged decode attention, the Triton kernel against gather + SDPA;
  6. the engine's throughput, SmolLM2-135M shapes with random weights: base, 16 GOAT (static
     merged and unmerged) and 16 LoRA adapters, batches 32 and 256, and the share of a decode
     step the GPU is busy, its launches and python calls (benchmarks/decode_profile.py): the
     idle share bounds what CUDA graphs could save.
Prints one table and writes it (markdown) to $OUT/gpu_check.md, or --out; steps past the time
budget are reported as skipped, and the file is rewritten after every row.

    PYTHONPATH=$PWD python3 -m benchmarks.gpu_check              # on the GPU machine
    PYTHONPATH=$PWD python3 -m benchmarks.gpu_check --device cpu --quick --skip-pytest  # rehearsal
"""

import argparse
import functools
import importlib.util
import itertools
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# What the check imports on the machine. The H200 image lacks orjson (the adapter reader's) and
# xgrammar (the engine's structured outputs): their wheels travel (docs/gpu.md). A missing one is
# named with the command that fetches its wheel.
REQUIRED_MODULES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "pytest",
                    "orjson", "xgrammar")
# The GPU tests: every test parametrized over CUDA (ids with "cuda"), the Triton kernels' tests,
# and the device helpers' own. Tests of the C++ CPU kernels are left out: _C is not built there.
PYTEST_FILES = ("tests/test_devices.py", "tests/ops/test_routed_lora_triton.py",
                "tests/ops/test_paged_attention.py", "tests/engine/test_model.py",
                "tests/engine/test_engine.py", "tests/adapters/test_fixture_reference.py",
                "tests/engine/test_device_pool.py")
PYTEST_SELECTION = "cuda or triton or devices"


@dataclass
class Table:
    """Rows (section, item, value, note), rendered as one markdown table; rewritten to `path`
    after every row, so a run stopped early still leaves what it measured."""

    path: Path | None = None
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # checks that did not pass

    def add(self, section: str, item: str, value: str, note: str = "") -> None:
        self.rows.append((section, item, value, note))
        print(f"[{section}] {item}: {value}" + (f"  ({note})" if note else ""), flush=True)
        if self.path is not None:
            self.path.write_text(self.render())

    def render(self) -> str:
        header = ("step", "what", "result", "note")
        widths = [max(len(r[i]) for r in [header, *self.rows]) for i in range(4)]
        lines = [header, tuple("-" * w for w in widths), *self.rows]
        return "\n".join("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                         + " |" for line in lines) + "\n"


def missing_modules(names: tuple[str, ...] = REQUIRED_MODULES) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def wheel_download_command(requirements: list[str]) -> str:
    """The command (run here, in the repo root, before the device call) that fetches wheels for
    the machine's python 3.12 on x86-64 into .whl/ (the device README's recipe)."""
    platforms = " ".join(f"--platform {p}" for p in (
        "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
        "manylinux2014_x86_64", "manylinux1_x86_64"))
    return ("python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 "
            f"--implementation cp {platforms} -d .whl {' '.join(requirements)}")


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> float:
    """Median milliseconds of fn(); CUDA events on the GPU, the wall clock on the CPU."""
    times = []
    for i in range(warmup + reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


# ---- 1. environment ------------------------------------------------------------------------


def step_environment(table: Table, device: str) -> None:
    table.add("env", "python", platform.python_version(), sys.executable)
    table.add("env", "torch", torch.__version__)
    triton = importlib.util.find_spec("triton")
    table.add("env", "triton", __import__("triton").__version__ if triton else "missing")
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        table.add("env", "device", props.name, f"sm_{props.major}{props.minor}, "
                  f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    else:
        table.add("env", "device", "cpu", f"{torch.get_num_threads()} threads")
    c_ext = importlib.util.find_spec("goat_runtime._C") is not None
    table.add("env", "goat_runtime._C", "present" if c_ext else "not built",
              "only the CPU kernels need it")
    missing = missing_modules()
    table.add("env", "missing modules", ", ".join(missing) or "none",
              wheel_download_command(missing) if missing else "")


# ---- 2. the fixture's reference outputs through the engine ---------------------------------


def step_fixture_reference(table: Table, device: str, tmp: Path) -> None:
    from safetensors.torch import load_file

    from goat_runtime.engine.config import EngineConfig
    from goat_runtime.engine.engine import LLMEngine
    from goat_runtime.engine.sampling import SamplingParams
    from tests.adapters.adapted_model import FIXTURE

    reference = load_file(str(FIXTURE / "reference_outputs.safetensors"))
    names = ["base", "goat0", "goat1", "lora0"]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    for dtype in ("float32", "bfloat16"):
        engine = LLMEngine(EngineConfig(
            model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters", device=device,
            dtype=dtype, static_cache_dir=tmp / "static", block_size=4, max_loras=4,
            max_num_batched_tokens=4096))
        prompts = {f"{n}-{i}": reference[f"input_{i}"].tolist() for n in names for i in range(3)}
        for request_id, prompt in prompts.items():
            name = request_id.split("-")[0]
            engine.add_request(request_id, prompt, params, None if name == "base" else name)
        tokens = {r: [] for r in prompts}
        error = 0.0
        while engine.has_work():
            for out in engine.step():
                tokens[out.request_id] += [t for d in out.outputs for t in d.token_ids]
                if out.prompt_logprobs is None:
                    continue
                name, i = out.request_id.split("-")
                expected = torch.log_softmax(reference[f"{name}_logits_{i}"], -1)
                prompt = prompts[out.request_id]
                error = max([error] + [abs(out.prompt_logprobs[p][prompt[p]]
                                           - expected[p - 1, prompt[p]].item())
                                       for p in range(1, len(prompt))])
        same = sum(tokens[r] == reference[f"{r.replace('-', '_greedy_')}"].tolist()
                   for r in prompts)
        if dtype == "float32" and same != len(prompts):
            table.problems.append("fixture: float32 tokens differ from the reference")
        table.add("fixture", f"{dtype}: greedy sequences equal to the reference",
                  f"{same}/{len(prompts)}", f"max |prompt logprob error| {error:.1e}"
                  + (" (must be 12/12)" if dtype == "float32" else " (near-ties may flip)"))
        engine.adapters.shutdown()
    step_slot_pool(table, device, tmp, reference)


def step_slot_pool(table: Table, device: str, tmp: Path, reference: dict) -> None:
    """The byte-sized slot pool (--max-gpu-adapter-memory): a budget of 2.5 GOAT slots gives 2
    slots; the fixture's adapters then share them, float32 tokens still the reference's. On the
    CPU (a rehearsal) the pool's accelerator logic runs on CPU tensors."""
    from unittest import mock

    import goat_runtime.engine.adapter_manager as manager
    from goat_runtime.engine.config import EngineConfig
    from goat_runtime.engine.engine import LLMEngine
    from goat_runtime.engine.sampling import SamplingParams
    from tests.adapters.adapted_model import FIXTURE

    slots = (functools.partial(manager.DeviceSlots, slots_on_host=False) if device == "cpu"
             else manager.DeviceSlots)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    names = ("goat0", "goat1", "lora0")
    with mock.patch.object(manager, "DeviceSlots", slots):
        budget = None
        for _ in range(2):  # first unbounded, to read one GOAT slot's bytes off the tensors
            engine = LLMEngine(EngineConfig(
                model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters", device=device,
                dtype="float32", static_cache_dir=tmp / "static", block_size=4,
                merge_static=False, max_loras=None if budget else 4,
                max_gpu_adapter_memory=budget))
            prompt = reference["input_0"].tolist()
            for i, name in enumerate(names if budget else names[:1]):
                engine.add_request(f"{name}-{i}", prompt, params, name)
            tokens: dict[str, list[int]] = {}
            while engine.has_work():
                for out in engine.step():
                    tokens.setdefault(out.request_id.split("-")[0], []).extend(
                        t for d in out.outputs for t in d.token_ids)
            pool = engine.adapters.slots
            engine.adapters.shutdown()
            if budget is None:
                budget = pool.nbytes() // 4 * 5 // 2
        same = sum(tokens[n] == reference[f"{n}_greedy_0"].tolist() for n in names)
        ok = pool.num_slots() == 2 and pool.nbytes() <= budget and same == len(names)
    if not ok:
        table.problems.append("slot pool: not 2 slots within the budget, or tokens differ")
    table.add("fixture", "slot pool of 2.5 GOAT slots' bytes: slots, tokens",
              f"{pool.num_slots()} slots, {same}/{len(names)}",
              f"{pool.nbytes()} of {budget} bytes (must be 2 slots, 3/3)")


# ---- 3. the GPU tests -----------------------------------------------------------------------


def pytest_command(quick: bool) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "-k", PYTEST_SELECTION, *PYTEST_FILES]
    if not quick and importlib.util.find_spec("xdist") is not None:
        command += ["-n", "8"]  # Triton compiles each kernel variant: in parallel
    if importlib.util.find_spec("pytest_timeout") is not None:
        command += ["--timeout", "120"]  # a hung kernel fails its test, not the whole check
    return command


def pytest_summary(output: str) -> str:
    """'12 passed, 1 failed' from pytest's last lines ('no summary' if there is none)."""
    counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", output[-2000:])
    return ", ".join(f"{n} {what}" for n, what in counts) or "no summary"


def step_pytest(table: Table, out_dir: Path, quick: bool, timeout: float) -> None:
    """pytest in its own process group, its output straight into pytest.log (no pipe that a
    leftover worker could hold open); on timeout the whole group is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    log_path = out_dir / "pytest.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(pytest_command(quick), cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
            status = f"exit {returncode}"
            if returncode != 0:
                table.problems.append(f"tests: pytest exited with {returncode}")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out after {timeout:.0f} s"
            table.problems.append("tests: pytest timed out")
    output = log_path.read_text(errors="replace")
    table.add("tests", f"pytest -k '{PYTEST_SELECTION}'", pytest_summary(output),
              f"{status}, {time.monotonic() - start:.0f} s, log: pytest.log")


# ---- 4. the routed op against plain LoRA ----------------------------------------------------


def lora_weights(d_in: int, out_sizes: tuple[int, ...], rank: int, slots: int,
                 gen: torch.Generator):
    """Plain LoRA in the routed op's layout (no router: E = 0, every row gate 1)."""
    from goat_runtime.ops import RoutedLoRAWeights

    offsets = [0]
    for size in out_sizes:
        offsets.append(offsets[-1] + size)
    shrink = torch.randn(slots, len(out_sizes), rank, d_in, generator=gen) / d_in**0.5
    expand = torch.randn(slots, rank, offsets[-1], generator=gen) / rank**0.5
    meta = torch.zeros(slots, len(out_sizes), 4, dtype=torch.int32)
    meta[..., 3] = rank
    router = torch.zeros(slots, len(out_sizes), 0, d_in)
    return RoutedLoRAWeights(shrink, router, expand, meta, tuple(offsets))


def _base_linears(xs: list[torch.Tensor], base: list[torch.Tensor]) -> None:
    for x, w in zip(xs, base, strict=True):
        F.linear(x, w)


def _routed_op(ys: list[torch.Tensor], xs: list[torch.Tensor], slots: torch.Tensor,
               stack: list) -> None:
    from goat_runtime.ops import add_routed_lora

    for y, x, w in zip(ys, xs, stack, strict=True):
        add_routed_lora(y, x, slots, w)


def _torch_lora(ys: list[torch.Tensor], xs: list[torch.Tensor], slots: torch.Tensor,
                stack: list) -> None:
    """Plain LoRA the naive way: each token's A and B gathered, then batched matmuls."""
    index = slots.long()
    for y, x, w in zip(ys, xs, stack, strict=True):
        h = torch.einsum("tsrk,tk->tsr", w.shrink[index], x)  # [T, slices, r]
        expand = w.expand[index]  # [T, r, d_out]
        for s, (lo, hi) in enumerate(itertools.pairwise(w.out_offsets)):
            y[:, lo:hi] += torch.bmm(h[:, s, None, :], expand[:, :, lo:hi])[:, 0]


def step_routed_op(table: Table, device: str, dtype: torch.dtype, quick: bool) -> None:
    from benchmarks.bench_routed_lora import NUM_SLOTS, PROJECTIONS, RANK, stacked_adapters
    from goat_runtime.ops import RoutedLoRAWeights

    def on(w: RoutedLoRAWeights) -> RoutedLoRAWeights:
        return w.to(device, dtype)

    gen = torch.Generator().manual_seed(0)
    base = [(torch.randn(sum(outs), d_in, generator=gen) / d_in**0.5).to(device, dtype)
            for _, d_in, outs in PROJECTIONS]
    goat = [on(stacked_adapters(d_in, outs, RANK, gen)) for _, d_in, outs in PROJECTIONS]
    lora = [on(lora_weights(d_in, outs, RANK, NUM_SLOTS, gen)) for _, d_in, outs in PROJECTIONS]
    for num_tokens in (4,) if quick else (32, 256):
        slots = (torch.arange(num_tokens) % NUM_SLOTS).to(device, torch.int32)
        xs = [torch.randn(num_tokens, w.shape[1], generator=gen).to(device, dtype) for w in base]
        ys = [F.linear(x, w) for x, w in zip(xs, base, strict=True)]
        reps, warmup = (2, 1) if quick else (100, 5)
        base_ms = time_ms(functools.partial(_base_linears, xs, base), device, reps, warmup)
        for label, fn in (
                ("routed op, 16 GOAT (E=8, k=2, static rank 8)",
                 functools.partial(_routed_op, ys, xs, slots, goat)),
                ("routed op, 16 plain LoRA (E=0)",
                 functools.partial(_routed_op, ys, xs, slots, lora)),
                ("torch gather + bmm, 16 plain LoRA",
                 functools.partial(_torch_lora, ys, xs, slots, lora))):
            ms = time_ms(fn, device, reps, warmup)
            table.add("routed op", f"T={num_tokens}: {label}", f"{ms:.3f} ms",
                      f"{ms / base_ms:.2f} x the layer's base linears ({base_ms:.3f} ms)")


# ---- 5. paged decode attention --------------------------------------------------------------


def step_attention(table: Table, device: str, dtype: torch.dtype, quick: bool) -> None:
    from goat_runtime.ops.paged_attention import (
        paged_decode_attention,
        paged_decode_attention_torch,
    )

    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16  # SmolLM2-135M
    gen = torch.Generator().manual_seed(0)
    cases = [(4, 40)] if quick else [(32, 256), (32, 1024), (256, 256), (256, 1024)]
    for num_seqs, context in cases:
        blocks = -(-context // block_size)
        order = torch.randperm(num_seqs * blocks, generator=gen)  # scattered blocks
        tables = order.view(num_seqs, blocks).to(device, torch.int32)
        cache_shape = (num_seqs * blocks, block_size, kv_heads, head_dim)
        k_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
        v_cache = torch.randn(cache_shape, generator=gen).to(device, dtype)
        q = torch.randn(num_seqs, heads, head_dim, generator=gen).to(device, dtype)
        lens = torch.full((num_seqs,), context, dtype=torch.int64, device=device)
        args = (q, k_cache, v_cache, tables, lens, context, head_dim**-0.5)
        reps, warmup = (2, 1) if quick else (50, 5)
        kernel_ms = time_ms(functools.partial(paged_decode_attention, *args), device, reps,
                            warmup)
        torch_ms = time_ms(functools.partial(paged_decode_attention_torch, *args), device, reps,
                           warmup)
        error = (paged_decode_attention(*args).float()
                 - paged_decode_attention_torch(*args).float()).abs().max().item()
        kv_bytes = 2 * num_seqs * context * kv_heads * head_dim * q.element_size()
        table.add("attention", f"S={num_seqs}, context {context}: kernel vs gather + SDPA",
                  f"{kernel_ms:.3f} vs {torch_ms:.3f} ms",
                  f"{torch_ms / kernel_ms:.1f}x; kernel reads K/V at "
                  f"{kv_bytes / kernel_ms / 1e6:.0f} GB/s; max |diff| {error:.1e}")


# ---- 6. the engine --------------------------------------------------------------------------


def step_engine(table: Table, device: str, dtype: str, quick: bool, tmp: Path,
                deadline: float) -> None:
    from benchmarks.bench_engine import EngineRun, workload
    from benchmarks.decode_profile import profile_decode
    from benchmarks.floors import measure_bandwidth
    from benchmarks.random_model import (
        NUM_ADAPTERS,
        TINY_SMOLLM2,
        write_goat_and_lora,
        write_random_model,
    )
    from goat_runtime.adapters.binding import base_linear_shapes
    from goat_runtime.engine.config import EngineConfig
    from goat_runtime.engine.engine import LLMEngine

    model_dir = tmp / "model"
    write_random_model(model_dir, TINY_SMOLLM2 if quick else None)
    goat, lora = write_goat_and_lora(tmp / "goat", tmp / "lora", base_linear_shapes(model_dir))
    batches = (2,) if quick else (32, 256)
    length = 4 if quick else 128
    cases = {"base": ({}, [None]),
             "16 GOAT, static merged": ({"adapter_dir": tmp / "goat", "merge_static": True}, goat),
             "16 GOAT, unmerged": ({"adapter_dir": tmp / "goat", "merge_static": False}, goat),
             "16 LoRA": ({"adapter_dir": tmp / "lora"}, lora)}
    base_tok_s: dict[int, float] = {}
    bandwidth = measure_bandwidth(buffer_bytes=(32 << 20) if quick else (1 << 30), device=device)
    for label, (extra, adapters) in cases.items():
        if time.monotonic() > deadline:
            table.add("engine", label, "skipped", "time budget spent")
            continue
        engine = LLMEngine(EngineConfig(
            model_dir=model_dir, device=device, dtype=dtype, static_cache_dir=tmp / "static",
            max_loras=NUM_ADAPTERS, max_num_seqs=max(batches), max_num_batched_tokens=2048,
            kv_cache_memory=(64 << 20) if quick else (8 << 30), enable_prefix_caching=False,
            **extra))
        for name in adapters:
            if name is not None:
                engine.adapters.request_load(name).result()
        run = EngineRun(engine)
        warm_up = workload(argparse.Namespace(requests=2, prompt=4), engine.vocab_size)
        run.run(warm_up, adapters, 4, bandwidth)
        for batch in batches:
            prompts = workload(argparse.Namespace(requests=batch, prompt=length),
                               engine.vocab_size)
            result = run.run(prompts, adapters, length, bandwidth)
            tok_s = result.tok_s
            base_tok_s.setdefault(batch, tok_s)
            table.add("engine", f"{label}, batch {batch}", f"{tok_s:,.0f} tok/s",
                      f"{tok_s / base_tok_s[batch]:.2f} x base; decode at "
                      f"{result.of_floor:.2f} of its floor ({result.step_mb:.1f} MB a step at "
                      f"{bandwidth / 1e9:.0f} GB/s); {length} prompt + {length} generated "
                      f"tokens per request, {dtype}")
        if label in ("base", "16 GOAT, unmerged"):
            for batch in batches:
                profiled = profile_decode(engine, adapters, batch, 2 if quick else 10, device)
                table.add("engine", f"{label}, batch {batch}: decode step",
                          profiled.summary(device),
                          "CUDA graphs could save at most the idle share")
        engine.adapters.shutdown()
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()


# ---- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="benchmarks' dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a rehearsal)")
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds; later steps are skipped once it is spent")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_check.md and pytest.log (default: $OUT, else .)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (use --device cpu to rehearse)")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.out = args.out or Path(os.environ.get("OUT") or ".")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    args.out.mkdir(parents=True, exist_ok=True)
    table = Table(args.out / "gpu_check.md")
    dtype = getattr(torch, args.dtype)
    torch.set_grad_enabled(False)
    steps: list[tuple[str, Callable[[Path], None]]] = [
        ("env", lambda tmp: step_environment(table, args.device)),
        ("fixture", lambda tmp: step_fixture_reference(table, args.device, tmp)),
        ("tests", lambda tmp: None if args.skip_pytest else step_pytest(
            table, args.out, args.quick, max(30.0, min(200.0, deadline - time.monotonic())))),
        ("routed op", lambda tmp: step_routed_op(table, args.device, dtype, args.quick)),
        ("attention", lambda tmp: step_attention(table, args.device, dtype, args.quick)),
        ("engine", lambda tmp: step_engine(table, args.device, args.dtype, args.quick, tmp,
                                           deadline)),
    ]
    for name, step in steps:
        if time.monotonic() > deadline:
            table.add(name, "step", "skipped", "time budget spent")
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                step(Path(tmp))
        except Exception as exc:  # one broken step must not hide the others' results
            table.problems.append(f"{name}: {type(exc).__name__}")
            table.add(name, "step", "FAILED", f"{type(exc).__name__}: {exc}"[:300])
    table.add("total", "wall time", f"{time.monotonic() - start:.0f} s",
              "; ".join(table.problems) or "every check passed")
    print()
    print(table.render())
    return 1 if table.problems else 0


if __name__ == "__main__":
    sys.exit(main())
