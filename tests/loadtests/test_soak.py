"""CI smoke run of the soak test (loadtests/soak.py): goat-serve in a subprocess on the
goat-peft-tiny fixture, a short warm-up and 25 s of every kind of traffic (streams, disconnects,
n > 1, echo with logprobs, adapter loads and unloads, corrupt adapters, bursts past the queue
limit), then the script's own checks, its CSV and its plot. About 45 s.

The RSS limits are loosened here: 25 s after an 8 s warm-up measure the allocator's warm-up
(RSS still climbs for minutes on the tiny model too), not a leak; judging that is the full run's
job (docs/benchmarks.md). Every other check keeps its limit."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from loadtests.soak import main
from loadtests.soak_checks import WANTED

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"


@pytest.mark.slow
def test_soak_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    capsys: pytest.CaptureFixture[str]) -> None:
    # Static GOAT terms are cached under GOAT_CACHE_DIR (inherited by the server).
    monkeypatch.setenv("GOAT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "soak"
    code = main([
        "--model-dir", str(FIXTURE / "base"), "--adapter-src", str(FIXTURE / "adapters"),
        "--out-dir", str(out), "--duration", "25", "--warmup", "8", "--sample-interval", "1",
        "--settle", "3", "--clients", "4", "--adapter-every", "6", "--corrupt-every", "6",
        "--burst-every", "8", "--request-timeout", "30", "--prompt-words", "4:16",
        "--max-tokens", "2:12", "--kv-cache-memory", "16MiB",
        "--rss-tolerance", "1.0", "--max-rss-slope", "1000",
    ])
    printed = capsys.readouterr().out
    report = json.loads((out / "soak.json").read_text())
    failed = [c for c in report["checks"] if not c["ok"]]
    assert code == 0 and not failed, (failed, printed[-3000:])
    assert "soak passed" in printed and "RSS" in printed
    results = report["results"]
    seen = {(r["kind"], r["verdict"]) for r in results}
    assert set(WANTED.items()) <= seen
    assert not [r for r in results if r["verdict"] == "failure"]
    with (out / "soak.csv").open() as f:
        rows = list(csv.DictReader(f))
    phases = [r["phase"] for r in rows]
    assert {"warmup", "baseline", "traffic", "end"} <= set(phases)
    assert phases.index("baseline") < phases.index("traffic") < phases.index("end")
    assert all(float(r["rss_mb"]) > 0 and int(r["threads"]) > 0 for r in rows)
    assert [r["kv_blocks"] for r in rows if r["phase"] == "end"] == ["0"] * phases.count("end")
    assert (out / "soak.png").stat().st_size > 10_000
    rss_checks = {c["name"]: c["detail"] for c in report["checks"] if "RSS" in c["name"]}
    assert "MB after warm-up" in rss_checks["RSS back to baseline"]
    assert "MB/min" in rss_checks["RSS trend"]
