"""The endpoint probe against fake servers built from recorded answers, and its pure rules."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmroom_cli import endpoints
from llmroom_cli.endpoints import ModelInfo, ServerInfo, choose_model, llm_specs, normalize_endpoint, probe
from llmroom_cli.errors import EndpointError, UsageError
from tests.fake_llm_servers import FakeLLMServer, fixture, fixture_json


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(trust_env=False) as client:
        yield client


def probe_fake(http: httpx.Client, kind: str, variant: str = "default") -> tuple[ServerInfo, list[str]]:
    with FakeLLMServer(kind, variant) as server:
        info = probe(http, server.url)
        assert info.url == server.url
        return info, server.requests


def by_id(info: ServerInfo) -> dict[str, ModelInfo]:
    return {m.id: m for m in info.models}


# -- every kind, from the recorded answers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "variant", "expected"),
    [
        ("ollama", "default", "ollama"),
        ("ollama", "empty", "ollama"),
        ("ollama", "no-ps", "ollama"),
        ("lmstudio", "default", "lmstudio"),
        ("lmstudio", "0.3", "lmstudio"),
        ("lmstudio", "old", "lmstudio"),
        ("llamacpp", "default", "llamacpp"),
        ("llamacpp", "ollama-compat", "llamacpp"),
        ("llamacpp", "api-key", "llamacpp"),
        ("vllm", "default", "vllm"),
        ("localai", "default", "localai"),
        ("openai", "default", "openai"),
    ],
)
def test_every_kind_is_identified(http: httpx.Client, kind: str, variant: str, expected: str) -> None:
    info, requests = probe_fake(http, kind, variant)
    assert (info.kind, info.status) == (expected, "ready")
    # A known server is recognised in a handful of requests (an unknown one asks each native route once).
    assert len(requests) <= (9 if expected == "openai" else 5), requests
    assert len(requests) == len(set(requests)), requests


def test_ollama_models_loaded_state_from_api_ps(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "ollama")
    assert info.version == "0.12.6"
    models = by_id(info)
    assert list(models) == ["deepseek-r1:latest", "llama3.2:latest", "mistral:latest"]
    assert models["llama3.2:latest"] == ModelInfo(
        "llama3.2:latest", loaded=False, quantization="Q4_K_M", size=2019393189
    )
    # Loaded (in /api/ps) though not in /api/tags: still servable, with the context it was loaded with.
    assert models["mistral:latest"] == ModelInfo(
        "mistral:latest", loaded=True, context_length=4096, quantization="Q4_0", size=5137025024
    )


def test_ollama_without_api_ps_leaves_loaded_unknown(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "ollama", "no-ps")
    assert [m.loaded for m in info.models] == [None, None]
    assert info.models[0].to_json() == {
        "id": "deepseek-r1:latest",
        "loaded": None,
        "embedding": False,
        "quantization": "Q4_K_M",
        "size": 4683075271,
    }


def test_empty_ollama_lists_nothing_and_says_how_to_pull(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "ollama", "empty")
    assert info.models == []
    with pytest.raises(EndpointError, match="no models") as caught:
        choose_model(info, None)
    assert "ollama pull llama3.2" in str(caught.value)
    assert caught.value.exit_code == 6


def test_lmstudio_04_uses_api_v1(http: httpx.Client) -> None:
    info, requests = probe_fake(http, "lmstudio")
    assert "/api/v1/models" in requests
    models = by_id(info)
    gemma = models["google/gemma-4-26b-a4b"]
    assert (gemma.loaded, gemma.context_length, gemma.quantization) == (True, 4096, "Q4_K_M")
    assert gemma.size == 17990911801
    assert models["deepseek-r1"].loaded is False
    assert models["deepseek-r1"].context_length == 131072
    assert models["text-embedding-nomic-embed-text-v1.5-embedding"].embedding
    assert [m.id for m in info.chat_models()] == ["google/gemma-4-26b-a4b", "deepseek-r1"]


def test_lmstudio_03_uses_api_v0(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "lmstudio", "0.3")
    models = by_id(info)
    assert models["meta-llama-3.1-8b-instruct"] == ModelInfo(
        "meta-llama-3.1-8b-instruct", loaded=True, context_length=131072, quantization="Q4_K_M"
    )
    assert models["qwen2-vl-7b-instruct"].loaded is False
    assert models["text-embedding-nomic-embed-text-v1.5"].embedding


def test_old_lmstudio_from_header_and_owner(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "lmstudio", "old")
    assert [(m.id, m.loaded, m.embedding) for m in info.models] == [
        ("meta-llama-3.1-8b-instruct", None, False),
        ("text-embedding-nomic-embed-text-v1.5", None, True),
    ]


def test_llamacpp_context_and_build_from_props(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "llamacpp")
    assert info.version == "b6400-3a4b5c6d"
    assert info.models == [
        ModelInfo(
            "../models/Meta-Llama-3.1-8B-Instruct-Q4_K_M.gguf",
            loaded=True,
            context_length=1024,
            size=4912898304,
        )
    ]


def test_llamacpp_with_an_api_key_is_still_named_from_its_public_routes(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "llamacpp", "api-key")
    assert info.kind == "llamacpp"
    assert info.version is None and info.models[0].context_length is None
    with FakeLLMServer("llamacpp", "api-key") as server:
        keyed = probe(http, server.url, api_key="secret")
    assert (keyed.version, keyed.models[0].context_length) == ("b6400-3a4b5c6d", 1024)


def test_llamacpp_loading_then_ready(http: httpx.Client) -> None:
    with FakeLLMServer("llamacpp", "loading") as server:
        info = probe(http, server.url)
        assert (info.kind, info.status, info.models) == ("llamacpp", "loading", [])
        with pytest.raises(EndpointError, match="still loading"):
            choose_model(info, None)
        server.set_ready()
        ready = probe(http, server.url)
    assert (ready.kind, ready.status) == ("llamacpp", "ready")
    assert choose_model(ready, None).id.endswith("Q4_K_M.gguf")


def test_vllm_context_from_max_model_len(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "vllm")
    assert info.version == "0.10.1.1"
    models = by_id(info)
    assert models["meta-llama/Llama-3.1-8B-Instruct"].context_length == 131072
    assert models["sql-lora"].context_length is None
    assert all(m.loaded for m in info.models)


def test_localai_imitating_ollama_is_named_localai(http: httpx.Client) -> None:
    with FakeLLMServer("localai") as server:
        # The imitation itself: these answers alone would say "ollama".
        assert http.get(server.url + "/").text == "Ollama is running"
        assert http.get(server.url + "/api/version").json() == {"version": "0.9.0"}
        info = probe(http, server.url)
    assert (info.kind, info.version) == ("localai", "v3.5.0")
    # The ids are /v1/models' (what chat requests name), not the imitation's `:latest` names.
    assert [(m.id, m.loaded, m.embedding, m.quantization) for m in info.models] == [
        ("qwen3-8b", True, False, "Q4_K_M"),
        ("nomic-embed-text-v1.5", False, True, "F16"),
    ]


def test_localai_starting_is_loading(http: httpx.Client) -> None:
    with FakeLLMServer("localai", "starting") as server:
        assert probe(http, server.url).status == "loading"
        server.set_ready()
        assert probe(http, server.url).status == "ready"


# -- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "variant"), [("vllm", "auth"), ("lmstudio", "auth"), ("localai", "auth")])
def test_401_asks_for_an_api_key(http: httpx.Client, kind: str, variant: str) -> None:
    with FakeLLMServer(kind, variant) as server, pytest.raises(EndpointError) as caught:
        probe(http, server.url)
    assert "API key" in str(caught.value) and server.url in str(caught.value)


def test_api_key_is_sent_and_a_wrong_one_is_named(http: httpx.Client) -> None:
    with FakeLLMServer("openai", api_key="sk-right") as server:
        assert probe(http, server.url, api_key="sk-right").kind == "openai"
        with pytest.raises(EndpointError, match="rejected the API key"):
            probe(http, server.url, api_key="sk-wrong")
    with FakeLLMServer("vllm", "auth") as server:
        assert probe(http, server.url, api_key="secret").kind == "vllm"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_nothing_listening_names_the_url(http: httpx.Client) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(EndpointError) as caught:
        probe(http, url)
    assert str(caught.value).startswith(f"no LLM server answers at {url}")
    assert "is it running?" in str(caught.value)


def test_lmstudio_200_with_error_is_not_a_model_list() -> None:
    """LM Studio answers a wrong base URL (here: a path prefix) with 200 and an `error` body."""
    unexpected = json.loads(fixture("lmstudio-error-unexpected-endpoint.json"))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=unexpected, headers={"X-Powered-By": "Express"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(EndpointError, match="not as an OpenAI-compatible") as caught:
            probe(client, "http://localhost:1234/api")
    assert "http://localhost:1234/api" in str(caught.value)


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [(404, b"404 page not found", "text/plain"), (200, b"<html>hi</html>", "text/html"), (200, b"{}", "")],
)
def test_something_else_answering_is_not_an_llm_server(status: int, body: bytes, content_type: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=body, headers={"Content-Type": content_type})

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(EndpointError, match="not as an OpenAI-compatible LLM server"):
            probe(client, "http://127.0.0.1:8080")


def test_ollama_403_mentions_the_key_and_the_origin() -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(403))) as client:
        with pytest.raises(EndpointError, match="wants an API key") as caught:
            probe(client, "http://127.0.0.1:11434")
    assert "OLLAMA_ORIGINS" in str(caught.value)


def test_other_503_is_an_error_not_loading() -> None:
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(503))) as client:
        with pytest.raises(EndpointError, match="unavailable"):
            probe(client, "http://127.0.0.1:8000")


# -- identification by combined signals (MockTransport) ---------------------------------------------


def mock(routes: dict[str, httpx.Response]) -> tuple[httpx.Client, list[str]]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        answer = routes.get(request.url.path)
        return answer if answer is not None else httpx.Response(404, text="404 page not found")

    return httpx.Client(transport=httpx.MockTransport(handler)), seen


def ok(name: str, **headers: str) -> httpx.Response:
    return httpx.Response(200, content=fixture(name), headers={"Content-Type": "application/json", **headers})


def test_llamacpp_loading_from_the_server_header() -> None:
    client, seen = mock(
        {"/v1/models": httpx.Response(503, json={"error": "busy"}, headers={"Server": "llama.cpp"})}
    )
    with client:
        info = probe(client, "http://127.0.0.1:9931")
    assert (info.kind, info.status) == ("llamacpp", "loading")
    assert seen == ["/v1/models"]


def test_llamacpp_loading_from_the_error_shape_without_header() -> None:
    loading = httpx.Response(503, content=fixture("llamacpp-health-loading.json"))
    client, _ = mock({"/v1/models": loading, "/props": loading})
    with client:
        assert probe(client, "http://127.0.0.1:8080").status == "loading"


def test_old_llamacpp_lets_models_through_while_props_is_503() -> None:
    client, _ = mock(
        {
            "/v1/models": ok("llamacpp-v1-models.json", Server="llama.cpp"),
            "/props": httpx.Response(503, content=fixture("llamacpp-health-loading-legacy.json")),
        }
    )
    with client:
        assert probe(client, "http://127.0.0.1:8080").status == "loading"


def test_llamacpp_answering_api_tags_is_not_ollama() -> None:
    """No Server header, an unfamiliar owner: the Ollama-like /api/tags (sizes as "") gives it away."""
    listing = fixture_json("llamacpp-v1-models-with-ollama-compat.json")
    listing["data"][0]["owned_by"] = "someone"
    del listing["data"][0]["meta"]
    del listing["models"]
    client, _ = mock(
        {
            "/v1/models": httpx.Response(200, json=listing),
            "/api/tags": ok("llamacpp-v1-models-with-ollama-compat.json"),
            "/api/version": httpx.Response(200, json={"version": "0.0.0"}),
            "/props": ok("llamacpp-props.json"),
        }
    )
    with client:
        info = probe(client, "http://127.0.0.1:11434")
    assert info.kind == "llamacpp"


def test_localai_behind_an_ollama_hint_is_localai() -> None:
    """`"data": null` hints Ollama; LocalAI's imitation /api/tags (sha256: digests) says otherwise."""
    client, _ = mock(
        {
            "/v1/models": ok("ollama-v1-models-empty.json"),
            "/api/version": ok("localai-api-version-ollama-compat.json"),
            "/api/tags": ok("localai-api-tags-ollama-compat.json"),
            "/readyz": httpx.Response(200),
        }
    )
    with client:
        info = probe(client, "http://127.0.0.1:11434")
    assert info.kind == "localai"


def test_empty_localai_tags_null_is_not_ollama() -> None:
    client, _ = mock(
        {
            "/v1/models": httpx.Response(200, json={"object": "list", "data": None}),
            "/api/version": ok("localai-api-version-ollama-compat.json"),
            "/api/tags": httpx.Response(200, json={"models": None}),
            "/readyz": httpx.Response(200),
        }
    )
    with client:
        info = probe(client, "http://127.0.0.1:8080")
    assert (info.kind, info.models) == ("localai", [])


def test_ollama_with_only_user_models_is_found_without_hints() -> None:
    listing = fixture_json("ollama-v1-models.json")
    for entry in listing["data"]:
        entry["owned_by"] = "alice"
    client, _ = mock(
        {
            "/v1/models": httpx.Response(200, json=listing),
            "/api/version": ok("ollama-api-version.json"),
            "/api/tags": ok("ollama-api-tags.json"),
            "/api/ps": httpx.Response(200, json={"models": []}),
        }
    )
    with client:
        info = probe(client, "http://127.0.0.1:11434")
    assert info.kind == "ollama"
    assert [m.loaded for m in info.models] == [False, False]


def test_express_header_alone_does_not_make_lmstudio() -> None:
    client, _ = mock({"/v1/models": ok("openai-v1-models.json", **{"X-Powered-By": "Express"})})
    with client:
        assert probe(client, "http://127.0.0.1:1234").kind == "openai"


def test_vllm_needs_version_and_shape() -> None:
    client, _ = mock({"/v1/models": ok("vllm-v1-models.json")})
    with client:
        assert probe(client, "http://127.0.0.1:8000").kind == "openai"


def test_llamacpp_router_mode_loaded_state() -> None:
    client, _ = mock(
        {
            "/v1/models": ok("llamacpp-router-models.json", Server="llama.cpp"),
            "/props": httpx.Response(400, json={"error": {"message": "model is required"}}),
        }
    )
    with client:
        info = probe(client, "http://127.0.0.1:8080")
    assert info.kind == "llamacpp"
    assert [(m.id, m.loaded, m.context_length) for m in info.models] == [
        ("ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", True, None),
        ("ggml-org/Qwen3-8B-GGUF:Q4_K_M", False, None),
    ]


def test_bind_address_is_probed_on_loopback() -> None:
    hosts: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        return ok("openai-v1-models.json")

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        info = probe(client, "http://0.0.0.0:8000/v1")
    assert info.url == "http://0.0.0.0:8000"
    assert hosts and set(hosts) == {"127.0.0.1"}


def test_ollama_embedding_families() -> None:
    tags = fixture_json("ollama-api-tags.json")
    bert = json.loads(json.dumps(tags["models"][1]))
    bert.update(name="all-minilm:latest", model="all-minilm:latest")
    bert["details"].update(family="bert", families=["bert"])
    nomic = json.loads(json.dumps(bert))
    nomic.update(name="mxbai:latest", model="mxbai:latest")
    nomic["details"].update(family="nomic-bert", families=["nomic-bert"])
    tags["models"] += [bert, nomic]
    client, _ = mock(
        {
            "/v1/models": ok("ollama-v1-models.json"),
            "/api/version": ok("ollama-api-version.json"),
            "/api/tags": httpx.Response(200, json=tags),
        }
    )
    with client:
        info = probe(client, "http://127.0.0.1:11434")
    assert [m.id for m in info.chat_models()] == ["deepseek-r1:latest", "llama3.2:latest"]


# -- probe_local ----------------------------------------------------------------------------------


def test_probe_local_finds_every_server_and_skips_the_rest(http: httpx.Client) -> None:
    nothing = f"http://127.0.0.1:{_free_port()}"
    with (
        FakeLLMServer("ollama") as ollama,
        FakeLLMServer("llamacpp") as llama,
        FakeLLMServer("vllm", "auth") as locked,
    ):
        found = endpoints.probe_local(http, candidates=[ollama.url, nothing, llama.url, locked.url])
    assert [(s.url, s.kind) for s in found] == [(ollama.url, "ollama"), (llama.url, "llamacpp")]


def test_probe_local_defaults_to_the_usual_ports() -> None:
    ports = [u.rsplit(":", 1)[1] for u in endpoints.LOCAL_CANDIDATES]
    assert ports == ["11434", "1234", "8080", "9931", "8000"]
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(404))) as client:
        assert endpoints.probe_local(client, []) == []


# -- normalize_endpoint / probe_url ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://localhost:11434", "http://localhost:11434"),
        ("http://localhost:11434/", "http://localhost:11434"),
        ("http://localhost:1234/v1", "http://localhost:1234"),
        ("http://localhost:1234/v1/", "http://localhost:1234"),
        ("  http://localhost:1234/v1  ", "http://localhost:1234"),
        ("localhost:11434", "http://localhost:11434"),
        ("127.0.0.1:8080/v1", "http://127.0.0.1:8080"),
        ("HTTP://LocalHost:8000", "http://localhost:8000"),
        ("https://api.example.com/openai/v1", "https://api.example.com/openai"),
        ("http://host:8080/proxy/ollama/", "http://host:8080/proxy/ollama"),
        ("http://host:8080//proxy//v1//", "http://host:8080/proxy"),
        ("http://host:8080/v1/v1", "http://host:8080/v1"),
        ("http://host:8080/v10", "http://host:8080/v10"),
        ("http://0.0.0.0:8000", "http://0.0.0.0:8000"),
        ("http://[::1]:8000/v1", "http://[::1]:8000"),
        ("http://my_box.local", "http://my_box.local"),
    ],
)
def test_normalize_endpoint(raw: str, expected: str) -> None:
    assert normalize_endpoint(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "   ",
        "ftp://localhost:11434",
        "http://",
        "http://local host:1234",
        "http://localhost:11434 /v1",
        "http://user:pw@localhost:11434",
        "http://localhost:11434/?x=1",
        "http://localhost:11434#frag",
        "http://localhost:0",
        "http://localhost:99999",
        "http://localhost:port",
        "http://[nope]:80",
        "http://bad!host:80",
        "//localhost:80",
    ],
)
def test_normalize_endpoint_refuses(raw: str) -> None:
    with pytest.raises(UsageError) as caught:
        normalize_endpoint(raw)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("http://0.0.0.0:8000", "http://127.0.0.1:8000"),
        ("0.0.0.0:8080/v1", "http://127.0.0.1:8080"),
        ("http://[::]:8000/x", "http://[::1]:8000/x"),
        ("http://localhost:11434", "http://localhost:11434"),
        ("http://10.0.0.2:11434", "http://10.0.0.2:11434"),
    ],
)
def test_probe_url(raw: str, expected: str) -> None:
    assert endpoints.probe_url(raw) == expected


_segment = st.text(alphabet="abcv01/._-", max_size=12)


@given(
    host=st.sampled_from(["localhost", "127.0.0.1", "[::1]", "example.com"]),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    path=_segment,
)
def test_normalize_endpoint_is_idempotent_and_never_doubles_slashes(
    host: str, port: int | None, path: str
) -> None:
    raw = f"http://{host}{'' if port is None else f':{port}'}/{path}"
    once = normalize_endpoint(raw)
    assert normalize_endpoint(once) == once or once.endswith("/v1")
    assert "//" not in once.split("://", 1)[1]
    assert not once.endswith("/")


# -- choose_model / llm_specs ---------------------------------------------------------------------


def server(*models: ModelInfo, kind: str = "ollama", status: str = "ready") -> ServerInfo:
    return ServerInfo("http://127.0.0.1:11434", kind, status, "0.12.6", list(models))


CHAT_A = ModelInfo("deepseek-r1:latest", loaded=False)
CHAT_B = ModelInfo("llama3.2:latest", loaded=True, context_length=4096, quantization="Q4_K_M")
EMBED = ModelInfo("nomic-embed-text:latest", loaded=True, embedding=True)


def test_requested_model_exact_and_ollama_latest() -> None:
    info = server(CHAT_A, CHAT_B, EMBED)
    assert choose_model(info, "llama3.2:latest") is CHAT_B
    assert choose_model(info, "llama3.2") is CHAT_B
    localai = server(ModelInfo("qwen3-8b"), kind="localai")
    assert choose_model(localai, "qwen3-8b:latest").id == "qwen3-8b"


def test_requested_model_missing_lists_what_is_served() -> None:
    with pytest.raises(EndpointError) as caught:
        choose_model(server(CHAT_A, CHAT_B, EMBED), "llama3.3")
    text = str(caught.value)
    assert "'llama3.3'" in text and "deepseek-r1:latest, llama3.2:latest (loaded)" in text
    assert "nomic" not in text and "ollama pull llama3.3" in text


def test_requested_embedding_model_is_refused() -> None:
    with pytest.raises(EndpointError, match="embedding model"):
        choose_model(server(CHAT_A, EMBED), "nomic-embed-text")


def test_single_loaded_chat_model_wins_among_many() -> None:
    asked: list[Any] = []
    assert choose_model(server(CHAT_A, CHAT_B, EMBED), None, asked.append) is CHAT_B  # type: ignore[arg-type]
    assert asked == []


def test_single_chat_model_wins_even_beside_a_loaded_embedding() -> None:
    assert choose_model(server(CHAT_A, EMBED), None) is CHAT_A


def test_several_candidates_ask_or_list() -> None:
    other = ModelInfo("qwen3:8b", loaded=True)
    info = server(CHAT_A, CHAT_B, other, EMBED)
    offered: list[list[ModelInfo]] = []

    def ask(models: list[ModelInfo]) -> ModelInfo:
        offered.append(models)
        return models[-1]

    assert choose_model(info, None, ask) is other
    assert offered == [[CHAT_A, CHAT_B, other]]
    with pytest.raises(EndpointError) as caught:
        choose_model(info, None)
    assert "deepseek-r1:latest, llama3.2:latest (loaded), qwen3:8b (loaded)" in str(caught.value)
    assert "--model" in str(caught.value)


def test_only_embedding_models_is_no_chat_model() -> None:
    with pytest.raises(EndpointError, match="only embedding models"):
        choose_model(server(EMBED, kind="lmstudio"), None)


def test_unknown_loaded_state_still_picks_the_only_model() -> None:
    assert choose_model(server(ModelInfo("model-id-0"), kind="openai"), None).id == "model-id-0"


def test_llm_specs_only_known_keys() -> None:
    info = server(CHAT_B)
    assert llm_specs(info, CHAT_B) == {
        "server": "ollama",
        "version": "0.12.6",
        "context_length": 4096,
        "quantization": "Q4_K_M",
        "loaded": True,
    }
    bare = ServerInfo("http://x", "openai", "ready", None, [ModelInfo("m")])
    assert llm_specs(bare, bare.models[0]) == {"server": "openai"}


def test_server_info_json_round_shape(http: httpx.Client) -> None:
    info, _ = probe_fake(http, "lmstudio", "0.3")
    data = json.loads(json.dumps(info.to_json()))
    assert set(data) == {"url", "kind", "status", "version", "models"}
    assert data["models"][0] == {
        "id": "qwen2-vl-7b-instruct",
        "loaded": False,
        "embedding": False,
        "context_length": 32768,
        "quantization": "4bit",
    }


def test_fake_servers_answer_as_recorded(http: httpx.Client) -> None:
    """The traps the probe relies on, checked on the fakes themselves."""
    checks: list[tuple[str, str, str, Callable[[httpx.Response], bool]]] = [
        ("lmstudio", "default", "/api/tags", lambda r: r.status_code == 200 and "error" in r.json()),
        ("lmstudio", "default", "/v1/models", lambda r: r.headers["x-powered-by"] == "Express"),
        ("ollama", "empty", "/v1/models", lambda r: r.json()["data"] is None),
        ("ollama", "default", "/nope", lambda r: r.status_code == 404 and r.text == "404 page not found"),
        ("llamacpp", "loading", "/health", lambda r: r.status_code == 503),
        ("llamacpp", "loading", "/v1/models", lambda r: r.status_code == 503),
        ("llamacpp", "default", "/v1/models", lambda r: r.headers["server"] == "llama.cpp"),
        ("llamacpp", "ollama-compat", "/api/tags", lambda r: r.json()["models"][0]["size"] == ""),
        ("vllm", "auth", "/version", lambda r: r.status_code == 200),
        ("localai", "auth", "/v1/models", lambda r: r.headers["www-authenticate"] == "Bearer"),
    ]
    for kind, variant, path, check in checks:
        with FakeLLMServer(kind, variant) as fake:
            answer = http.get(fake.url + path)
        assert check(answer), (kind, variant, path, answer.status_code, answer.text[:200])
