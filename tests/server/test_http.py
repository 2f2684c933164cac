"""Raw HTTP against the real server: malformed and oversized bodies, error shapes (never 422,
never an echo of the body), SSE framing, request ids, health."""

import json

import httpx
import openai
import pytest

from tests.server.conftest import BASE, PROMPTS, LiveServer, greedy, token_ids


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


SECRET = "do-not-echo-this-value-7f3a"


@pytest.mark.parametrize(("body", "param"), [
    (b'{"model": "goat0", "prompt": "w5", ', None),  # truncated JSON
    (b"not json at all", None),
    (b'["model", "goat0"]', None),  # not an object
    (b"", None),
    (json.dumps({"model": "goat0", "prompt": {"nested": SECRET}}).encode(), "prompt"),
    (json.dumps({"model": "goat0", "prompt": "w5", "max_tokens": SECRET}).encode(),
     "max_tokens"),
    (json.dumps({"model": "goat0", "prompt": "w5", "temperature": [SECRET]}).encode(),
     "temperature"),
    (json.dumps({"model": "goat0", "prompt": "w5", "stream": SECRET}).encode(), "stream"),
    (json.dumps({"model": 5, "prompt": "w5"}).encode(), "model"),
    (json.dumps({"prompt": "w5"}).encode(), "model"),
    (json.dumps({"model": "goat0"}).encode(), "prompt"),
])
def test_malformed_completion_bodies(http: httpx.Client, body: bytes, param: str | None) -> None:
    response = http.post("/v1/completions", content=body,
                         headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, param)
    assert SECRET not in response.text
    assert error["type"] == "invalid_request_error"


POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
               "/v1/unload_lora_adapter", "/tokenize", "/detokenize"]


@pytest.mark.parametrize("route", POST_ROUTES)
@pytest.mark.parametrize(("body", "kind"), [
    (b"null", "null"), (b"", "null"), (b"[]", "an array"), (b'"w5"', "a string"),
    (b"5", "a number"), (b"true", "a boolean")])
@pytest.mark.slow
def test_body_must_be_an_object(http: httpx.Client, route: str, body: bytes, kind: str) -> None:
    response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["message"].startswith(f"The request body must be a JSON object, got {kind}")
    assert error["param"] is None and error["code"] == "invalid_body"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": BASE, "messages": "w5"}, "messages"),
    ({"model": BASE, "messages": [{"content": "w5"}]}, "messages[0].role"),
    ({"model": BASE, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": BASE, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"model": BASE, "messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2},
     "top_logprobs"),
    ({"model": BASE, "messages": [{"role": "user", "content": "w5"}],
      "response_format": {"type": "json_schema"}}, "response_format"),
    ({"model": BASE, "messages": [{"role": "user", "content": "w5"}],
      "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 3}}}},
     "response_format"),
])
def test_malformed_chat_bodies(http: httpx.Client, body: dict, param: str) -> None:
    assert_openai_error(http.post("/v1/chat/completions", json=body), 400, param)


def test_unknown_fields_are_refused_by_name(http: httpx.Client) -> None:
    body = {"model": "goat0", "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0,
            "user": "u-1"}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert token_ids(response.json()["choices"][0]["text"]) == greedy("goat0", 0)[:2]
    error = assert_openai_error(http.post("/v1/completions", json={
        **body, "some_future_openai_field": {"x": 1}}), 400, "some_future_openai_field")
    assert error["code"] == "unsupported_parameter"


def test_oversized_body_is_413(http: httpx.Client) -> None:
    big = json.dumps({"model": "goat0", "prompt": "w5 " * (3 << 20)})
    assert_openai_error(http.post("/v1/completions", content=big,
                                  headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit holds while streaming the body in
        for _ in range(80):
            yield b" " * (64 << 10)

    response = http.post("/v1/completions", content=chunks(),
                         headers={"Content-Type": "application/json"})
    assert_openai_error(response, 413)


def test_unknown_route_and_method_are_openai_errors(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/nothing-here"), 404)
    assert_openai_error(http.get("/v1/completions"), 405)


def test_sse_framing(http: httpx.Client) -> None:
    body = {"model": "lora0", "prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert payloads[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                     "total_tokens": 8}
    assert all(p["object"] == "text_completion" for p in payloads)
    assert token_ids("".join(p["choices"][0]["text"] for p in payloads[:-1])) == greedy(
        "lora0", 0)[:3]


def test_request_id_header(http: httpx.Client) -> None:
    response = http.get("/v1/models", headers={"X-Request-Id": "client-id-1"})
    assert response.headers["x-request-id"] == "client-id-1"
    generated = http.get("/v1/models", headers={"X-Request-Id": "bad id\twith spaces"})
    assert len(generated.headers["x-request-id"]) == 32


def test_health(http: httpx.Client) -> None:
    response = http.get("/health")
    assert response.status_code == 200


def test_health_is_503_without_engine_loop(fake_server) -> None:
    live: LiveServer = fake_server()
    with live.http() as http:
        assert http.get("/health").status_code == 200
        live.engine.alive = False
        assert_openai_error(http.get("/health"), 503)
        # and requests are refused with Retry-After rather than hanging
        response = http.post("/v1/completions", json={"model": BASE, "prompt": "w5"})
        assert_openai_error(response, 503)
        assert response.headers["retry-after"]
    with pytest.raises(openai.InternalServerError) as info:
        live.client().completions.create(model=BASE, prompt="w5")
    assert info.value.status_code == 503


def test_openapi_declares_what_the_server_sends(http: httpx.Client) -> None:
    """No 422 (never sent); the 400s and 404s with OpenAI's error body; /health and /metrics
    with the content types they really answer with."""
    schema = http.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    error = schema["components"]["schemas"]["ErrorInfo"]
    assert set(error["properties"]) == {"message", "type", "param", "code"}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation["responses"]
            assert "422" not in responses, path
            for status, response in responses.items():
                if int(status) >= 400:
                    assert response["content"] == {"application/json": {"schema": error_ref}}
    for path in POST_ROUTES:
        assert {"400", "404"} <= set(schema["paths"][path]["post"]["responses"]), path
    assert "404" in schema["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    metrics = http.get("/metrics")
    declared = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(declared) == [metrics.headers["content-type"]]
    assert metrics.headers["content-type"].startswith("text/plain; version=")
    health = http.get("/health")
    assert "content-type" not in health.headers and health.content == b""
    assert "content" not in schema["paths"]["/health"]["get"]["responses"]["200"]
    assert schema["paths"]["/health"]["get"]["responses"]["503"]["content"]
    adapters = schema["paths"]["/v1/load_lora_adapter"]["post"]["responses"]["200"]["content"]
    assert list(adapters) == ["text/plain"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        ok = schema["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}
