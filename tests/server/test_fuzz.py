"""Property-based fuzzing of the live server with schemathesis, from its own /openapi.json:
schema-valid and schema-invalid requests (schemathesis' positive and negative generation modes)
to every operation. Every answer must be no 5xx, conform to the schema (status, content type,
body), carry OpenAI's error body when it is an error, and come within 30 s; afterwards the same
server still returns the exact greedy tokens. Deterministic (derandomized): 555 cases, about a
minute on 2 cores.

The operations' strategies run under Hypothesis here rather than through
`schemathesis.pytest.from_fixture(...).parametrize()`: schemathesis 4.32.5's lazy loader sets
`request.node._nodeid`, which pytest 9.2 no longer has.
"""

import time
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.conftest import PROMPTS, greedy, start_real_server, token_ids

MAX_EXAMPLES = 60  # cases per operation and generation mode
TIMEOUT = 30.0  # seconds: a slower answer is a hang


@schemathesis.check
def openai_error_body(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                      case: schemathesis.Case) -> None:
    """An error answer is `{"error": {"message", "type", "param", "code"}}` and no more."""
    if response.status_code < 400:
        return
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not OpenAI-shaped: {body}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, f"not OpenAI-shaped: {error}"
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str | int), error


@schemathesis.check
def answered_in_time(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                     case: schemathesis.Case) -> None:
    assert response.elapsed < TIMEOUT, f"took {response.elapsed:.1f} s"


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, negative_data_rejection, openai_error_body,
          answered_in_time]


# Random model and folder names are unknown (a 404 before any work is done): 4 cases in 5 name
# the base or a fixture adapter instead, so that the engine serves the generated parameters.
KNOWN = st.sampled_from([None, "base", "goat0", "goat1", "lora0"])


def _name_known(case: schemathesis.Case, name: str | None) -> None:
    if name is None:
        return
    if isinstance(case.body, dict):
        for key in ("model", "lora_path"):
            if isinstance(case.body.get(key), str):
                case.body[key] = name
        if case.operation.path == "/v1/unload_lora_adapter" and isinstance(
                case.body.get("lora_name"), str):
            case.body["lora_name"] = name
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = name


def _fuzz(operation: Any, mode: GenerationMode, base_url: str, stats: dict[str, Any]) -> None:
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode), name=KNOWN)
    def run(case: schemathesis.Case, name: str | None) -> None:
        if mode is GenerationMode.POSITIVE:
            _name_known(case, name)
        response = case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=TIMEOUT)
        stats["cases"] += 1
        stats["by_status"][response.status_code] = stats["by_status"].get(
            response.status_code, 0) + 1

    try:
        run()
    except Exception as exc:
        exc.add_note(f"operation {operation.label}, {mode.value} mode")
        raise


@pytest.mark.slow
def test_fuzz_the_api(tmp_path_factory: pytest.TempPathFactory,
                      capsys: pytest.CaptureFixture[str]) -> None:
    live = start_real_server(tmp_path_factory.mktemp("fuzz"))  # the fuzzer may load adapters
    try:
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) == 11
        stats: dict[str, Any] = {"cases": 0, "by_status": {}}
        started = time.monotonic()
        for operation in operations:
            # a body to negate (a string path parameter or nothing at all has no invalid value)
            negatable = "requestBody" in operation.definition.raw
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)[:1 + negatable]:
                _fuzz(operation, mode, live.url, stats)
        seconds = time.monotonic() - started
        with capsys.disabled():
            print(f"\nschemathesis: {stats['cases']} cases in {seconds:.0f} s, by status "
                  f"{dict(sorted(stats['by_status'].items()))}")
        assert stats["cases"] >= len(operations) * MAX_EXAMPLES
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as http:  # still exact after it
            assert http.get("/health").status_code == 200
            for model in ("base", "goat0", "lora0"):
                for i, prompt in enumerate(PROMPTS):
                    response = http.post("/v1/completions", json={
                        "model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                        "ignore_eos": True})
                    assert response.status_code == 200, response.text
                    assert token_ids(response.json()["choices"][0]["text"]) == greedy(model, i)
    finally:
        live.stop()
