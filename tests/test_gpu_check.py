"""The device check's CPU-side steps (benchmarks/gpu_check.py): what can be rehearsed without a
GPU is, so that its one run on a lent machine does not fail on something a CPU would catch."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_table_is_one_markdown_table_rewritten_after_every_row(tmp_path):
    table = gpu_check.Table(tmp_path / "t.md")
    table.add("env", "torch", "2.11")
    first = (tmp_path / "t.md").read_text()
    table.add("engine", "base, batch 32", "1,000 tok/s", "1.00 x base")
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert first.splitlines()[2].startswith("| env ")
    assert lines[0].split("|")[1:5] == [" step   ", " what           ", " result      ",
                                        " note        "]
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # aligned columns
    assert "| engine | base, batch 32 | 1,000 tok/s | 1.00 x base |" in lines[3]


def test_arguments(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    args = gpu_check.parse_args(["--device", "cpu", "--quick"])
    assert (args.out, args.dtype, args.quick, args.skip_pytest) == (tmp_path, "float32", True,
                                                                    False)
    assert gpu_check.parse_args(["--device", "cpu", "--dtype", "bfloat16"]).dtype == "bfloat16"
    monkeypatch.delenv("OUT")
    assert gpu_check.parse_args(["--device", "cpu"]).out == Path(".")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])  # --device cuda by default: refused without a GPU


def test_required_modules_and_the_wheel_recipe():
    assert gpu_check.missing_modules(("json", "no_such_module_goat")) == ["no_such_module_goat"]
    assert gpu_check.missing_modules() == []  # what the check needs is here too
    command = gpu_check.wheel_download_command(["pytest==8.4.2"])
    assert command.startswith("python3 -m pip download --no-deps --only-binary=:all: "
                              "--python-version 3.12 --implementation cp ")
    assert "--platform manylinux_2_17_x86_64" in command
    assert command.endswith("-d .whl pytest==8.4.2")


def test_pytest_summary():
    output = "....\n=== 3 failed, 120 passed, 4 skipped, 9 deselected in 61.2s ===\n"
    assert gpu_check.pytest_summary(output) == "3 failed, 120 passed, 4 skipped, 9 deselected"
    assert gpu_check.pytest_summary("Traceback ...") == "no summary"


@pytest.mark.slow
def test_the_selection_collects_the_gpu_tests_and_not_the_cpu_kernels():
    """On this machine (no CUDA) the selection is the Triton and device-helper tests; the C++
    kernels' tests, which need goat_runtime._C (not built on the GPU machine), are left out."""
    command = [*gpu_check.pytest_command(quick=True), "--collect-only"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    files = {i.split("::")[0] for i in ids}
    assert {"tests/test_devices.py", "tests/ops/test_routed_lora_triton.py",
            "tests/ops/test_paged_attention.py"} <= files
    assert any("test_triton_kernel_matches_gather_and_sdpa" in i for i in ids)
    assert not any("test_kernel_and_torch_path_match_reference" in i for i in ids)
    assert not any("[cpu" in i and "triton" not in i for i in ids)


@pytest.mark.slow
def test_pytest_step_runs_and_logs(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check, "PYTEST_FILES", ("tests/test_devices.py",))
    table = gpu_check.Table()
    gpu_check.step_pytest(table, tmp_path, quick=True, timeout=120)
    (_, _, result, note), = table.rows
    assert result.endswith("passed") and "failed" not in result, result
    assert note.startswith("exit 0") and "passed" in (tmp_path / "pytest.log").read_text()
    assert table.problems == []
    monkeypatch.setattr(gpu_check, "pytest_command",
                        lambda quick: [sys.executable, "-c", "raise SystemExit(3)"])
    gpu_check.step_pytest(table, tmp_path, quick=True, timeout=60)
    assert table.problems == ["tests: pytest exited with 3"]


@pytest.mark.slow
def test_pytest_step_kills_a_run_past_its_timeout(monkeypatch, tmp_path):
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    monkeypatch.setattr(gpu_check, "pytest_command", lambda quick: sleeper)
    table = gpu_check.Table()
    start = time.monotonic()
    gpu_check.step_pytest(table, tmp_path, quick=True, timeout=2)
    assert time.monotonic() - start < 30
    assert table.rows[0][2] == "no summary" and table.rows[0][3].startswith("timed out after 2 s")
    assert table.problems == ["tests: pytest timed out"]
    assert (tmp_path / "pytest.log").read_text() == "started\n"


@pytest.mark.slow
def test_goat_runtime_imports_without_the_cpu_extension():
    """The GPU machine runs the checkout as is, without goat_runtime._C (built for this
    machine's python, not for the one there): everything the CUDA path imports must load."""
    script = ("import sys; sys.modules['goat_runtime._C'] = None\n"
              "import goat_runtime.engine.engine, goat_runtime.engine.async_engine\n"
              "import goat_runtime.ops.triton_kernel, goat_runtime.ops.triton_attention\n"
              "import benchmarks.gpu_check\n"
              "import torch\n"
              "from goat_runtime.ops import paged_decode_attention\n"
              "try:\n"
              "    paged_decode_attention(torch.zeros(1, 1, 4), torch.zeros(1, 1, 1, 4),\n"
              "                           torch.zeros(1, 1, 1, 4),\n"
              "                           torch.zeros(1, 1, dtype=torch.int32),\n"
              "                           torch.ones(1, dtype=torch.int64), 1, 1.0)\n"
              "except ImportError:\n"
              "    print('cpu kernel unavailable, as expected')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, check=False,
                            env={"PATH": "", "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "cpu kernel unavailable, as expected"


def test_a_failing_step_is_reported_and_the_others_still_run(monkeypatch, tmp_path):
    def broken(*args):
        raise RuntimeError("no kernel image")

    monkeypatch.setattr(gpu_check, "step_environment", broken)
    monkeypatch.setattr(gpu_check, "step_fixture_reference", lambda table, *a: table.add(
        "fixture", "ran", "yes"))
    for name in ("step_routed_op", "step_attention", "step_engine"):
        monkeypatch.setattr(gpu_check, name, lambda *a: None)
    assert gpu_check.main(["--device", "cpu", "--skip-pytest", "--out", str(tmp_path)]) == 1
    text = (tmp_path / "gpu_check.md").read_text()
    assert re.search(r"\| env +\| step +\| FAILED +\| RuntimeError: no kernel image", text)
    assert "| ran " in text and "env: RuntimeError" in text


@pytest.mark.slow
def test_quick_rehearsal_on_the_cpu(tmp_path):
    """Every step but pytest (covered above) on tiny shapes: the same code the GPU run takes."""
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip-pytest", "--out",
                           str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    for section in ("env", "fixture", "routed op", "attention", "engine", "total"):
        assert f"| {section} " in text, section
    assert "FAILED" not in text and "skipped" not in text and "every check passed" in text
    assert re.search(r"float32: greedy sequences equal to the reference +\| 12/12 ", text)
    assert re.search(r"slot pool of 2.5 GOAT slots' bytes: slots, tokens +\| 2 slots, 3/3 ", text)
    for case in ("base", "16 GOAT, static merged", "16 GOAT, unmerged", "16 LoRA"):
        assert re.search(rf"\| {case}, batch 2 +\| [\d,]+ tok/s", text), case
