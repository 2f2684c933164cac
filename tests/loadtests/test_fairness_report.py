"""loadtests.fairness says whether its heavy key asked more than the server served it alone:
below capacity no scheduler has to choose, and the light key's ratio measures nothing; and it
reads the engine's steps and queue times from a live server's /metrics."""

import time
from dataclasses import replace

import httpx

from loadtests import fairness
from loadtests.common import free_port
from loadtests.fairness import (
    SECRETS,
    Phase,
    Round,
    build_parser,
    interleaved_rounds,
    overload,
    report,
    run_phase,
    served_model,
    sliced_phase,
    start_server,
)
from loadtests.key_clients import KeyClients, KeyJob


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


def test_a_phase_reads_the_engine_steps_and_queue_times_from_the_live_server(tmp_path) -> None:
    """One short phase of both keys against a real server with the benchmark's key file, each
    key from its own client process: the step figures and each key's queue time come from
    the server's /metrics (an admin key that sends nothing)."""
    args = build_parser("fairness", None).parse_args(
        ["--duration", "2", "--light-rate", "4", "--output-len", "8", "--warmup", "0"])
    server = start_server("fair", args, tmp_path)
    assert server.env == {"OMP_NUM_THREADS": "1"}  # --threads' default: one torch thread
    try:
        server.wait_healthy()
        with KeyClients(SECRETS) as clients:
            phase = run_phase(server, served_model(server), "light + heavy",
                              {"light": 4.0, "heavy": 8.0}, args, 0, clients)
    finally:
        server.stop()
    assert phase.errors == 0 and phase.tokens > 0
    assert len(phase.ttft_s["light"]) >= 2 and len(phase.ttft_s["heavy"]) >= 6
    assert all(0 < ttft < args.duration for ttft in phase.ttft_s["heavy"])
    assert set(phase.client_lag_s) == {"light", "heavy"} and all(phase.client_lag_s.values())
    assert phase.client_cpu_s is not None and phase.client_cpu_s > 0
    steps_per_s, seqs_per_step, step_ms = phase.step_figures()
    assert phase.steps >= 8 and steps_per_s == phase.steps / 2
    assert seqs_per_step is not None and 1 <= seqs_per_step <= args.max_num_seqs
    assert step_ms is not None and step_ms > 0
    assert phase.queue_ms["light"] is not None and phase.queue_ms["heavy"] is not None
    assert Phase("empty", 1.0).step_figures() == (0.0, None, None)


def test_sliced_servers_stream_in_their_turns_and_run_again_after(tmp_path) -> None:
    """The time-sliced comparison against two real servers (take_turns' own test shows the
    turns): each key's requests go to both from a client per server, both stream tokens, and
    neither is left stopped."""
    args = build_parser("fairness", None).parse_args(
        ["--duration", "2", "--output-len", "8", "--warmup", "0", "--slice-ms", "100"])
    servers = {policy: start_server(policy, args, tmp_path) for policy in ("fair", "fcfs")}
    try:
        for server in servers.values():
            server.wait_healthy()
        models = {policy: served_model(server) for policy, server in servers.items()}
        names = [f"{key}@{policy}" for policy in servers for key in SECRETS]
        with KeyClients(names) as clients:
            served = sliced_phase(servers, models, {"light": 2.0, "heavy": 6.0}, args, 0,
                                  clients)
        for server in servers.values():
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        for server in servers.values():
            server.stop()
    assert set(served) == {"fair", "fcfs"} and all(rate > 0 for rate in served.values())


def test_a_key_client_counts_refused_requests_as_errors() -> None:
    """A client whose server is gone reports errors, not TTFTs; its process serves the next
    job as well (the same arrivals for the same seed). A request sent in the phase's last
    instant may be cut off before its refusal arrives: it counts as still waiting."""
    job = KeyJob(f"http://127.0.0.1:{free_port()}", "m", "light", "s", rate=20.0,
                 prompt_len=4, output_len=4, duration_s=0.5, seed=3, start_at=time.time())
    with KeyClients(["light"]) as clients:
        first = clients.run({"light": job})["light"]
        again = clients.run({"light": replace(job, start_at=time.time())})["light"]
    assert first.errors > 0 and first.tokens == again.tokens == 0
    assert first.errors + first.waiting == again.errors + again.waiting
    assert len(first.ttft_s) == first.waiting <= 1


def test_rounds_run_each_phase_on_every_policy_back_to_back(monkeypatch) -> None:
    """The machine drifts within minutes: a round runs light alone, both, heavy alone, each on
    both policies in a row with the same seed (the same arrivals), the policies' order
    alternating between rounds; each Round keeps its phases in the plan's order."""
    monkeypatch.setattr(fairness, "cpu_busy", lambda seconds: 0.0)
    args = build_parser("fairness", None).parse_args(["--rounds", "2"])
    calls: list[tuple[str, str, int]] = []

    def run_phase_on(policy: str, name: str, rates: dict[str, float], seed: int) -> Phase:
        calls.append((policy, name, seed))
        assert set(rates) == {"light", "heavy"} if name == "light + heavy" else len(rates) == 1
        return Phase(f"{policy} {name}", 1.0)

    results = interleaved_rounds(("fcfs", "fair"), args, run_phase_on)
    light, heavy, both = "light alone", "heavy alone (one key)", "light + heavy"
    assert calls == [("fcfs", light, 0), ("fair", light, 0), ("fcfs", both, 2),
                     ("fair", both, 2), ("fcfs", heavy, 1), ("fair", heavy, 1),
                     ("fair", light, 10), ("fcfs", light, 10), ("fair", both, 12),
                     ("fcfs", both, 12), ("fair", heavy, 11), ("fcfs", heavy, 11)]
    for policy, rounds_ in results.items():
        assert [[p.name for p in rnd.phases] for rnd in rounds_] == 2 * [
            [f"{policy} {light}", f"{policy} {heavy}", f"{policy} {both}"]]
