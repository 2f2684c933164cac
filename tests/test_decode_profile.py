"""The decode-step profile (benchmarks/decode_profile.py), rehearsed on the CPU with tiny shapes:
on a GPU the same code reads the device's busy time and the kernel launches."""

import pytest

from benchmarks import decode_profile
from benchmarks.decode_profile import DecodeProfile


def test_rehearsal_prints_both_cases(capsys):
    assert decode_profile.main(["--device", "cpu", "--quick", "--batch", "2", "--steps", "2",
                                "--ops"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if ": decode step " in line]
    assert [line.split(":")[0] for line in lines] == ["base, batch 2", "16 GOAT, unmerged, batch 2"]
    for line in lines:
        wall = float(line.split("decode step ")[1].split(" ms")[0])
        calls = int(line.split(", ")[-1].split(" python")[0].replace(",", ""))
        assert wall > 0 and calls > 100  # a step is hundreds of python calls at the least
    assert "Self CPU" in out  # torch's ops table


def test_summary_on_cuda_gives_the_busy_share():
    profile = DecodeProfile(wall_ms=20.0, busy_ms=2.5, launches=950.0, python_calls=10042.0,
                            ops_table="")
    assert profile.summary("cuda") == ("decode step 20.00 ms, GPU busy 2.50 ms (12%), "
                                       "950 launches, 10,042 python calls")
    assert profile.summary("cpu") == "decode step 20.00 ms, 10,042 python calls"


def test_refuses_cuda_without_a_device():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit):
        decode_profile.main([])
