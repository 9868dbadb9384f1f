"""llama.cpp probe details recorded from the real server (xllamacpp): quantization, context, sleep.

The recordings are in tests/fixtures/endpoints (llamacpp-xllamacpp-*.json, README rows); the same
behaviour is checked live against the real server in test_llamacpp_real.py.
"""

from __future__ import annotations

import json

import httpx

from llmroom_cli.endpoints import choose_model, llm_specs, probe
from tests.fake_llm_servers import fixture, fixture_json

MODEL_ID = "/tmp/relay-tiny.gguf"


def llama(
    props: str, *, models: bytes | None = None, key: str | None = None
) -> tuple[httpx.Client, list[str]]:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.path} {request.headers.get('authorization', '-')}")
        if key is not None and request.headers.get("authorization") != f"Bearer {key}":
            return httpx.Response(401, content=fixture("llamacpp-error-invalid-api-key.json"))
        headers = {"Server": "llama.cpp", "Content-Type": "application/json"}
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, content=models or fixture("llamacpp-xllamacpp-v1-models.json"), headers=headers
            )
        if request.url.path == "/props":
            return httpx.Response(200, content=fixture(props), headers=headers)
        return httpx.Response(404, content=fixture("llamacpp-error-not-found.json"), headers=headers)

    return httpx.Client(transport=httpx.MockTransport(handler)), seen


def test_quantization_and_runtime_context_from_v1_models_meta() -> None:
    client, _ = llama("llamacpp-xllamacpp-props.json")
    with client:
        info = probe(client, "http://127.0.0.1:8080")
    assert (info.kind, info.status, info.version) == ("llamacpp", "ready", "b0-unknown")
    [model] = info.models
    assert (model.id, model.loaded, model.quantization, model.context_length) == (MODEL_ID, True, "Q8_0", 256)
    assert llm_specs(info, choose_model(info, None)) == {
        "server": "llamacpp",
        "version": "b0-unknown",
        "context_length": 256,
        "quantization": "Q8_0",
        "loaded": True,
    }


def test_quantization_from_props_model_ftype_when_meta_lacks_it() -> None:
    models = fixture_json("llamacpp-xllamacpp-v1-models.json")
    del models["data"][0]["meta"]["ftype"]
    del models["data"][0]["meta"]["n_ctx"]
    client, _ = llama("llamacpp-xllamacpp-props.json", models=json.dumps(models).encode())
    with client:
        [model] = probe(client, "http://127.0.0.1:8080").models
    # model_ftype from /props; the context from /props default_generation_settings.n_ctx
    assert (model.quantization, model.context_length) == ("Q8_0", 256)


def test_a_sleeping_server_reports_its_model_as_not_loaded() -> None:
    client, _ = llama("llamacpp-xllamacpp-props-sleeping.json")
    with client:
        info = probe(client, "http://127.0.0.1:8080")
    [model] = info.models
    assert model.loaded is False and info.status == "ready"  # a request wakes it: still servable
    assert choose_model(info, None) is model
    assert llm_specs(info, model)["loaded"] is False


def test_probe_sends_the_credentials_and_never_shows_them() -> None:
    client, seen = llama("llamacpp-xllamacpp-props.json", key="sk-local")
    with client:
        info = probe(client, "http://127.0.0.1:8080", credentials={"Authorization": "Bearer sk-local"})
    assert info.models[0].quantization == "Q8_0"
    assert all(line.endswith("Bearer sk-local") for line in seen)
