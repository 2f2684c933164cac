"""README.md's tenant key file, served as written (block `<!-- docs-test: tenant-keys -->`):
each key, with the secret its comment names, can and cannot do what the README says."""

import re
from collections.abc import Callable
from pathlib import Path

from goat_runtime.engine.outputs import AdapterInfo
from server.state import Settings
from tests.server.conftest import LiveServer
from tests.server.test_http import assert_openai_error

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"<!-- docs-test: tenant-keys -->\n```yaml\n(.*?)```", re.DOTALL)
BASE = "SmolLM2-135M-Instruct"


def test_readme_key_file_against_a_live_server(
        tmp_path: Path, fake_server: Callable[..., LiveServer]) -> None:
    (text,) = BLOCK.findall(README.read_text())
    secrets = dict(re.findall(r"- id: (\w+)[^\n]*\n\s+sha256: \w+\s+# \"([^\"]+)\"", text))
    assert set(secrets) == {"ops", "acme", "globex"}
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    adapters = [AdapterInfo(name, "goat", True, "device")
                for name in ("acme-support", "globex-legal")]
    live = fake_server(Settings(api_keys_file=path), base_name=BASE, adapters=adapters)
    with live.http() as http:
        def get(key: str, route: str) -> "list[str]":
            response = http.get(route, headers={"Authorization": f"Bearer {secrets[key]}"})
            assert response.status_code == 200, response.text
            return sorted(m["id"] for m in response.json()["data"])

        assert get("ops", "/v1/models") == sorted([BASE, "acme-support", "globex-legal"])
        assert get("acme", "/v1/models") == sorted([BASE, "acme-support"])
        assert get("globex", "/v1/models") == ["globex-legal"]
        assert_openai_error(http.get("/v1/models"), 401)
        acme = {"Authorization": f"Bearer {secrets['acme']}"}
        ops = {"Authorization": f"Bearer {secrets['ops']}"}
        body = {"model": "acme-support", "prompt": "w5", "max_tokens": 2}
        ok = http.post("/v1/completions", json=body, headers=acme)
        assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-requests"] == "600"
        assert ok.headers["x-ratelimit-limit-tokens"] == "200000"
        theirs = http.post("/v1/completions", json={**body, "model": "globex-legal"},
                           headers=acme)
        nobodys = http.post("/v1/completions", json={**body, "model": "globex-legax"},
                            headers=acme)
        assert assert_openai_error(theirs, 404)["code"] == "model_not_found"
        assert theirs.text.replace("globex-legal", "X") == nobodys.text.replace("globex-legax",
                                                                                "X")
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                      "/v1/admin/reload_keys"):
            assert_openai_error(http.post(route, json={"lora_name": "x", "lora_path": "x"},
                                          headers=acme), 403)
        assert_openai_error(http.get("/metrics", headers=acme), 403)
        assert http.get("/metrics", headers=ops).status_code == 200
        assert http.post("/v1/admin/reload_keys", headers=ops).status_code == 200
        assert http.get("/health").status_code == 200
