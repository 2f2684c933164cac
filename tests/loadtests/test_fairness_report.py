"""loadtests.fairness says whether its heavy key asked more than the server served it alone:
below capacity no scheduler has to choose, and the light key's ratio measures nothing."""

from loadtests.fairness import Phase, Round, build_parser, overload, report


def rounds(heavy_alone_tokens: list[int]) -> list[Round]:
    out = []
    for tokens in heavy_alone_tokens:
        phases = [Phase(name, 10.0) for name in ("light alone", "heavy alone", "both")]
        phases[1].tokens = tokens
        phases[0].ttft_s["light"] = [0.01]
        phases[2].ttft_s["light"] = [0.015]
        out.append(Round(phases, 0.0))
    return out


def test_overload_is_judged_against_what_the_heavy_key_was_served_alone() -> None:
    args = build_parser("fairness", None).parse_args(["--light-rate", "4"])  # 3,840 tok/s
    beyond = overload({"fair": rounds([28_000, 27_000, 29_000])}, args)
    assert beyond.startswith("heavy key asks 3,840 output tok/s, served alone 2,800 tok/s")
    assert beyond.endswith(": beyond capacity")
    assert "NOT beyond capacity" in overload({"fair": rounds([39_000, 40_000, 38_000])}, args)
    text = report({"fair": rounds([28_000, 27_000, 29_000])}, args)
    assert "light TTFT ratio, fair: median of 3 rounds 1.50" in text
    assert beyond in text
