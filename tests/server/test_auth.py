"""API keys: every route but /health and /metrics needs `Authorization: Bearer KEY`, decided on
the ASGI path; failures are OpenAI-shaped 401s (openai.AuthenticationError)."""

from collections.abc import Iterator

import openai
import pytest

from server.state import Settings
from tests.server.conftest import API_KEY, PROMPTS, LiveServer, start_real_server
from tests.server.test_http import assert_openai_error

OTHER_KEY = "second-key"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_real_server(tmp_path_factory.mktemp("auth"),
                             Settings(api_keys=(API_KEY, OTHER_KEY)))
    yield live
    live.stop()


def routes(live: LiveServer) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, path parameters filled in."""
    found = []
    for route in live.app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                found.append((method, route.path.replace("{model_id}", "goat0")))
    return found


@pytest.mark.slow
def test_every_route_requires_the_key(auth_server: LiveServer) -> None:
    all_routes = routes(auth_server)
    assert ("POST", "/v1/chat/completions") in all_routes and ("GET", "/docs") in all_routes
    with auth_server.http() as http:
        for method, path in all_routes:
            public = path in ("/health", "/metrics")
            bad_headers: list[dict[str, str]] = [
                {}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                {"Authorization": f"Basic {API_KEY}"}, {"Authorization": f"Bearer {API_KEY}x"},
                {"Authorization": "Bearer"}]
            for headers in bad_headers:
                response = http.request(method, path, headers=headers, json={})
                if public:
                    assert response.status_code == 200, (method, path)
                else:
                    error = assert_openai_error(response, 401)
                    assert error["code"] == "invalid_api_key"
                    assert response.headers["www-authenticate"] == "Bearer"
            for key in (API_KEY, OTHER_KEY):
                response = http.request(method, path, json={},
                                        headers={"Authorization": f"bearer {key}"})
                assert response.status_code != 401 and response.status_code < 500, (
                    method, path, response.status_code)
        # Unknown paths are protected too (no probing without a key).
        assert_openai_error(http.get("/v1/secret"), 401)


def test_decided_on_the_asgi_path_not_the_host(auth_server: LiveServer) -> None:
    with auth_server.http() as http:
        for path in ("/health/../v1/models", "/health%2F..%2Fv1%2Fmodels", "//health",
                     "/health/", "/metrics/x"):
            response = http.get(path, headers={"Host": "127.0.0.1"})
            assert response.status_code == 401, path
        spoofed = http.get("/v1/models", headers={"Host": "health", "X-Forwarded-Host": "x",
                                                  "X-Original-URL": "/health"})
        assert spoofed.status_code == 401


def test_openai_client_with_and_without_key(auth_server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        auth_server.client(api_key="wrong").models.list()
    assert info.value.status_code == 401
    client = auth_server.client(api_key=API_KEY)
    out = client.completions.create(model="goat0", prompt=PROMPTS[0], max_tokens=2,
                                    temperature=0)
    assert out.usage.completion_tokens == 2

