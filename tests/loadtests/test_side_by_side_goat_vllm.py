"""loadtests/side_by_side.py's --goat-vllm case: selected by its flag, reported as ratios to
stock vLLM with the same threads and to goat-serve's own engine."""

from types import SimpleNamespace

from loadtests.side_by_side import parse_args
from loadtests.side_by_side_report import CaseResult, ratio_table
from loadtests.vllm_server import vllm_thread_env


def _result(key: str, threads: str, tokens_per_s: float) -> CaseResult:
    summary = SimpleNamespace(output_token_throughput=tokens_per_s)
    case = SimpleNamespace(key=key, threads=threads)
    return CaseResult(case, 1.0, "", "", 0.0, runs={"closed": summary})


def test_flag_selects_the_case() -> None:
    assert parse_args(["--goat-vllm"]).goat_vllm
    assert not parse_args([]).goat_vllm
    assert vllm_thread_env("auto") == {}
    assert vllm_thread_env("2")["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_ratios_pair_the_same_threads() -> None:
    results = [_result("vllm-lora16-tauto", "auto", 40.0), _result("vllm-lora16-t2", "2", 50.0),
               _result("goat-goat16", "2", 100.0), _result("goat-vllm-goat16-t2", "2", 45.0)]
    table = ratio_table(results)
    rows = [line for line in table.splitlines() if "--engine vllm" in line]
    assert len(rows) == 2, table
    assert "0.90" in rows[0] and "vllm-lora16-t2" in rows[0], rows  # 45 / 50
    assert "0.45" in rows[1] and "goat-goat16" in rows[1], rows  # 45 / 100
