"""benchmarks.bench_linear: a row per shape, with a figure pair per row count and the GEMM
`fast_linear` takes for it (the tiny fixture's shapes F.linear, SmolLM2's oneDNN)."""

import pytest
import torch

from benchmarks.bench_linear import ROWS, SHAPES, main


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN")
def test_the_table_has_every_shape_and_the_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--calls", "2", "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and " x " in line and "d_out" not in line]
    assert len(rows) == len(SHAPES)
    chosen = {}
    for line, (d_out, d_in) in zip(rows, SHAPES, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == f"{d_out} x {d_in}" and len(cells) == 3 + len(ROWS)
        assert all(float(a) > 0 and float(b) > 0
                   for a, b in (cell.split(" / ") for cell in cells[2:-1]))
        chosen[d_out, d_in] = cells[-1]
    assert chosen[128, 128] == chosen[704, 128] == "F.linear"  # the fixture's
    assert chosen[576, 576] == chosen[3072, 576] == "oneDNN"  # SmolLM2-135M's
