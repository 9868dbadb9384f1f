"""Probing the local LLM server: which server it is, whether it is ready, and which models it serves.

A server is identified by combining signals, never by its port and never by one route alone: the
`Server` / `X-Powered-By` headers and the shape of `GET /v1/models` (the `owned_by` values, extra
fields such as llama.cpp's `meta` or vLLM's `max_model_len`, Ollama's `"data": null`) rank the
candidates; each candidate is then confirmed by its own native routes, fetched concurrently:

    ollama    /api/version + /api/tags whose entries have an integer `size` and a bare-hex `digest`
              (LocalAI imitates these routes with `size` 0 and `sha256:` digests; some llama.cpp
              builds answer /api/tags with empty-string sizes: both are told apart here)
    lmstudio  /api/v1/models (0.4+) or /api/v0/models (0.3.6+); older builds: `X-Powered-By: Express`
              together with `owned_by: organization_owner`
    llamacpp  two of: `Server: llama.cpp`, `owned_by: llamacpp` / `meta` in /v1/models, /props
    localai   two of: /v1/models entries without `owned_by`, /readyz (empty 200 or a 503 status),
              an Ollama-imitation /api/tags (`sha256:` digests, `size` 0, or `"models": null`)
    vllm      /version together with `owned_by: vllm` or `max_model_len` in /v1/models
    openai    anything else that serves /v1/models (models listed, nothing more known)

LM Studio answers unknown routes with 200 and a top-level `error` key, so such a body never counts
as an answer. Nothing is guessed: a field the server does not report stays None (`loaded`) or is
left out of the JSON.

Embedding models (never chosen by `choose_model`): LM Studio `type` "embeddings"/"embedding"; Ollama
`details.family`/`families` containing "bert" (bert, nomic-bert, xlm-roberta); an Ollama-style
`capabilities` list with "embedding" but not "completion" (LocalAI); otherwise, for every server,
a model id containing "embed" (text-embedding-3-small, nomic-embed-text, bge-...-embed).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import httpx

from llmroom_cli.errors import EndpointError, UsageError
from llmroom_cli.options import build_url, refuse_credentials

KINDS = ("ollama", "lmstudio", "llamacpp", "vllm", "localai", "openai")

# The usual local addresses: Ollama, LM Studio, llama.cpp and LocalAI (8080), llama.cpp's newest
# default (9931), vLLM. The port only says where to look, never what answers there.
LOCAL_CANDIDATES = (
    "http://127.0.0.1:11434",
    "http://127.0.0.1:1234",
    "http://127.0.0.1:8080",
    "http://127.0.0.1:9931",
    "http://127.0.0.1:8000",
)

CONNECT_S = 0.5
READ_S = 2.0
# find_servers knocks on ports that usually have nothing (refused at once) or something unrelated.
LOCAL_READ_S = 0.8
# Requests wait for a free connection of the caller's pool (it may hold only a few).
POOL_S = 5.0
# A model list is a few KiB; a stranger's endpoint could stream anything.
MAX_BODY_BYTES = 4 << 20
# The whole local search (every port at once): a server that answers slower than this is not one
# `join` should pick unasked; `probe URL` / `--endpoint URL` still wait READ_S for it.
SEARCH_DEADLINE_S = 2.0

_PULL_HINT = {
    "ollama": "pull one first, as in: ollama pull llama3.2",
    "lmstudio": "download and load one in LM Studio, or: lms get qwen3-8b",
    "llamacpp": "start llama-server with a chat model (-m FILE.gguf)",
    "vllm": "start vLLM with a chat model",
    "localai": "install one, as in: local-ai models install qwen3-8b",
    "openai": "load a chat model in the server",
}


@dataclass
class ModelInfo:
    """One model the server offers; None means the server did not say."""

    id: str
    loaded: bool | None = None
    embedding: bool = False
    context_length: int | None = None
    quantization: str | None = None
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        """`loaded` is null when unknown; the other unknown fields are left out."""
        out: dict[str, Any] = {"id": self.id, "loaded": self.loaded, "embedding": self.embedding}
        for key in ("context_length", "quantization", "size"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


@dataclass
class ServerInfo:
    """What `probe` found at one URL. `status` is "ready" or "loading" (a model is still loading)."""

    url: str
    kind: str
    status: str
    version: str | None
    models: list[ModelInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "kind": self.kind,
            "status": self.status,
            "version": self.version,
            "models": [m.to_json() for m in self.models],
        }

    def chat_models(self) -> list[ModelInfo]:
        """The models that can chat: everything but embedding models."""
        return [m for m in self.models if not m.embedding]


# -- URLs -----------------------------------------------------------------------------------------

_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9_.-]*[a-z0-9_])?")


def normalize_endpoint(url: str) -> str:
    """The base URL of an OpenAI-compatible server, or UsageError.

    Accepts `http(s)://host[:port][/path]`, and `host[:port][/path]` (taken as http://, as for the
    hub). Surrounding whitespace is dropped; repeated slashes are collapsed; a trailing "/" and a
    trailing "/v1" are stripped (routes are built as BASE/v1/models, BASE/api/tags); any other path
    prefix is kept (a reverse proxy's /ollama). Scheme and host are lower-cased. User info, query and
    fragment are refused. A bind address such as 0.0.0.0 is kept as typed: see `probe_url`.
    """
    text = url.strip()
    if not text:
        raise UsageError("the LLM endpoint URL is empty", "use --endpoint http://HOST:PORT")
    if any(ch.isspace() for ch in text):
        raise UsageError(f"invalid LLM endpoint URL {url!r}: it contains spaces")
    if "://" not in text:
        text = "http://" + text
    refuse_credentials(text, "LLM endpoint")
    bad = UsageError(
        f"invalid LLM endpoint URL {url!r}: expected http(s)://host[:port][/path]",
        "as in http://localhost:11434",
    )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise bad from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UsageError(f"invalid LLM endpoint URL {url!r}: it must start with http:// or https://")
    if "@" in parts.netloc or "?" in text or "#" in text or port == 0:
        raise bad
    host = parts.hostname or ""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
        host = f"[{host}]"
    elif not _HOST_RE.fullmatch(host):
        raise bad
    path = re.sub(r"/{2,}", "/", parts.path).rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")].rstrip("/")
    return build_url(scheme, host, port, path)


def probe_url(url: str) -> str:
    """The URL to connect to: a bind-all address (0.0.0.0, [::]) becomes loopback (127.0.0.1, [::1])."""
    base = normalize_endpoint(url)
    parts = urlsplit(base)
    host = parts.hostname or ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return base
    if not addr.is_unspecified:
        return base
    return build_url(parts.scheme, "127.0.0.1" if addr.version == 4 else "::1", parts.port, parts.path)


# -- HTTP answers ---------------------------------------------------------------------------------


@dataclass
class _Answer:
    """One route's answer; status 0 means nothing answered (`problem` says why)."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    problem: str = ""

    @cached_property
    def data(self) -> Any:
        """The JSON body, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    @property
    def ok(self) -> Any:
        """The JSON body of a 200 that is not an error (LM Studio says "error" with a 200), else None."""
        if self.status != 200:
            return None
        data = self.data
        if isinstance(data, dict) and "error" in data:
            return None
        return data

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "").lower()


class _Prober:
    """Fetches routes of one server, concurrently where asked, each route at most once."""

    def __init__(
        self,
        http: httpx.Client,
        base: str,
        api_key: str | None,
        read_s: float,
        credentials: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.http = http
        self.base = base
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.auth.update(credentials or {})
        self.read_s = read_s
        self.deadline = deadline  # time.monotonic() after which no route is asked or read further
        self.cache: dict[str, _Answer] = {}

    def get(self, *paths: str) -> list[_Answer]:
        missing = list(dict.fromkeys(p for p in paths if p not in self.cache))
        if len(missing) == 1:
            self.cache[missing[0]] = self._fetch(missing[0])
        elif missing:
            with ThreadPoolExecutor(max_workers=len(missing), thread_name_prefix="llmroom-probe") as pool:
                for path, answer in zip(missing, pool.map(self._fetch, missing), strict=True):
                    self.cache[path] = answer
        return [self.cache[p] for p in paths]

    def one(self, path: str) -> _Answer:
        return self.get(path)[0]

    def _timeout(self) -> httpx.Timeout | None:
        """Per-operation timeouts, cut to what is left before the deadline (None: it has passed)."""
        left = self.read_s if self.deadline is None else self.deadline - time.monotonic()
        if left <= 0:
            return None
        read = min(self.read_s, left)
        return httpx.Timeout(connect=min(CONNECT_S, left), read=read, write=read, pool=min(POOL_S, left))

    def _fetch(self, path: str) -> _Answer:
        late = _Answer(0, {}, problem="no answer in time")
        timeout = self._timeout()
        if timeout is None:
            return late
        try:
            with self.http.stream("GET", self.base + path, headers=self.auth, timeout=timeout) as response:
                chunks: list[bytes] = []
                size = 0
                for chunk in response.iter_bytes():
                    # A server trickling bytes never trips a per-read timeout: the clock does.
                    if self.deadline is not None and time.monotonic() > self.deadline:
                        return late
                    size += len(chunk)
                    if size > MAX_BODY_BYTES:
                        break
                    chunks.append(chunk)
                headers = {k.lower(): v for k, v in response.headers.items()}
                return _Answer(response.status_code, headers, b"".join(chunks))
        except httpx.TimeoutException:
            return _Answer(0, {}, problem="no answer in time")
        except httpx.HTTPError as exc:
            return _Answer(0, {}, problem=_why(exc))


def _why(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.TransportError):
        from llmroom_cli.http import in_words

        return str(in_words(exc)) or type(exc).__name__
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text


# -- JSON helpers (the servers' JSON is untrusted: every field is checked before use) ---------------


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _entries(data: Any) -> list[dict[str, Any]]:
    """The model entries of an OpenAI list (`"data": null` is an empty list), each with a string id."""
    return [e for e in _list(_dict(data).get("data")) if isinstance(e, dict) and _str(e.get("id"))]


def _embedding_by_name(name: str) -> bool:
    return "embed" in name.lower()


def _dedupe(models: list[ModelInfo]) -> list[ModelInfo]:
    seen: set[str] = set()
    out = []
    for m in models:
        if m.id not in seen:
            seen.add(m.id)
            out.append(m)
    return out


def _strip_latest(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


# -- identification -------------------------------------------------------------------------------


def _hints(v1: _Answer) -> list[str]:
    """Candidate kinds from /v1/models alone, most likely first (each is confirmed afterwards)."""
    score = dict.fromkeys(KINDS, 0)
    if "llama.cpp" in v1.header("server"):
        score["llamacpp"] += 2
    if v1.header("x-powered-by") == "express":
        score["lmstudio"] += 1
    data = _dict(v1.ok)
    if "data" in data and data["data"] is None:
        score["ollama"] += 1
    if isinstance(data.get("models"), list):
        score["llamacpp"] += 1
    entries = _entries(data)
    owners = {e.get("owned_by") for e in entries}
    if "llamacpp" in owners or any("meta" in e for e in entries):
        score["llamacpp"] += 1
    if "organization_owner" in owners:
        score["lmstudio"] += 1
    if "vllm" in owners or any("max_model_len" in e for e in entries):
        score["vllm"] += 1
    if "library" in owners:
        score["ollama"] += 1
    if entries and owners == {None}:
        score["localai"] += 1
    ranked = sorted((k for k in KINDS if score[k] > 0), key=lambda k: -score[k])
    return ranked


_NATIVE_ROUTES = {
    "ollama": ("/api/version", "/api/tags", "/api/ps"),
    "lmstudio": ("/api/v1/models", "/api/v0/models"),
    "llamacpp": ("/props",),
    "localai": ("/readyz", "/version", "/api/tags", "/api/ps"),
    "vllm": ("/version",),
}


def probe(
    http: httpx.Client,
    url: str,
    api_key: str | None = None,
    *,
    read_s: float = READ_S,
    credentials: Mapping[str, str] | None = None,
    deadline_s: float | None = None,
) -> ServerInfo:
    """Identify the server at `url` and list its models; raises EndpointError when it cannot.

    A server that is still loading its model answers with status "loading" (no error). `url` may be
    a bind address (0.0.0.0): it is probed through `probe_url`, and reported as given (normalised).
    `credentials` are headers sent with every probe request (options.parse_headers: the API key as
    `Authorization: Bearer`, --header ones); they are never part of a message. `deadline_s` bounds
    the whole probe (every route; a read already under way ends within `read_s`).
    """
    base = normalize_endpoint(url)
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    prober = _Prober(http, probe_url(base), api_key, read_s, credentials, deadline)
    v1 = prober.one("/v1/models")
    if v1.status == 0:
        raise EndpointError(f"no LLM server answers at {base}: {v1.problem}; is it running?")
    if v1.status in (401, 403):
        if prober.auth:
            raise EndpointError(
                f"the server at {base} rejected the API key (HTTP {v1.status})", "check the key"
            )
        hint = "give it the key, or turn authentication off for local use"
        if v1.status == 403:
            hint += "; a 403 may also mean it refuses this host or origin (Ollama: OLLAMA_ORIGINS)"
        raise EndpointError(f"the server at {base} wants an API key (HTTP {v1.status})", hint)
    if v1.status == 503:
        return _loading_or_fail(base, v1)
    if v1.ok is None or "data" not in _dict(v1.ok):
        raise EndpointError(
            f"something answers at {base}, but not as an OpenAI-compatible LLM server"
            f" (GET /v1/models: {_describe(v1)})",
            "give the server's base URL, as in http://localhost:11434",
        )
    hinted = _hints(v1)
    rest = [k for k in _NATIVE_ROUTES if k not in hinted]
    for group in (hinted, rest):
        if group is rest:
            # Nothing hinted (or nothing confirmed): ask every native route at once.
            prober.get(*(r for k in rest for r in _NATIVE_ROUTES[k]))
        for kind in group:
            found = _TRY[kind](prober, v1, base)
            if isinstance(found, str):
                found = _TRY[found](prober, v1, base, True)
            if isinstance(found, ServerInfo):
                return found
    return ServerInfo(base, "openai", "ready", None, _openai_models(v1))


def _describe(answer: _Answer) -> str:
    data = answer.data
    if answer.status == 200 and isinstance(data, dict) and "error" in data:
        return "HTTP 200 with an error: " + _error_text(data)[:120]
    if data is None:
        return f"HTTP {answer.status}, not JSON"
    if answer.status == 200:
        return "HTTP 200 without a model list"
    return f"HTTP {answer.status}"


def _error_text(data: Any) -> str:
    err = _dict(data).get("error")
    if isinstance(err, str):
        return err
    return str(_dict(err).get("message") or err)


def _loading_or_fail(base: str, v1: _Answer) -> ServerInfo:
    """A 503 on /v1/models: llama.cpp answers every route with one while it loads the model."""
    err = _dict(_dict(v1.data).get("error"))
    llama = "llama.cpp" in v1.header("server") or err.get("type") == "unavailable_error"
    if llama or "loading" in v1.body.decode("utf-8", "replace").lower():
        return ServerInfo(base, "llamacpp" if llama else "openai", "loading", None, [])
    raise EndpointError(f"the server at {base} is unavailable (HTTP 503)", "check its logs")


# Each _try_KIND returns a ServerInfo when the kind is confirmed, another kind's name when the native
# routes show an imitator, or None. `forced` means another confirmer already saw this kind's traits.


def _try_ollama(p: _Prober, v1: _Answer, base: str, forced: bool = False) -> ServerInfo | str | None:
    version, tags, ps = p.get("/api/version", "/api/tags", "/api/ps")
    tag_data = _dict(tags.ok)
    if "models" not in tag_data:
        return None
    if tag_data["models"] is None:
        return "localai"  # Go's nil slice: Ollama always sends [], LocalAI's imitation sends null
    entries = [e for e in _list(tag_data["models"]) if isinstance(e, dict)]
    if any(isinstance(e.get("size"), str) for e in entries):
        return "llamacpp"
    if any(str(e.get("digest", "")).startswith("sha256:") for e in entries):
        return "localai"
    ver = _str(_dict(version.ok).get("version"))
    if ver is None:
        return None
    running = {
        _str(e.get("name")) or _str(e.get("model")): e
        for e in _list(_dict(ps.ok).get("models"))
        if isinstance(e, dict)
    }
    ps_known = isinstance(_dict(ps.ok).get("models"), list)
    models = []
    for e in entries:
        name = _str(e.get("name")) or _str(e.get("model"))
        if name is not None:
            models.append(_ollama_model(name, e, running.get(name), ps_known))
    for name, e in running.items():
        # Still loaded after `ollama rm`: servable until it unloads.
        if name is not None and all(m.id != name for m in models):
            models.append(_ollama_model(name, e, e, True))
    return ServerInfo(base, "ollama", "ready", ver, _dedupe(models))


def _ollama_model(name: str, tag: dict[str, Any], run: dict[str, Any] | None, ps_known: bool) -> ModelInfo:
    details = _dict(tag.get("details"))
    families = [f for f in [details.get("family"), *_list(details.get("families"))] if isinstance(f, str)]
    return ModelInfo(
        id=name,
        loaded=(run is not None) if ps_known else None,
        embedding=_embedding_by_caps(tag) or any("bert" in f for f in families) or _embedding_by_name(name),
        context_length=_int(run.get("context_length")) if run else None,
        quantization=_str(details.get("quantization_level")),
        size=_int(tag.get("size")),
    )


def _embedding_by_caps(entry: dict[str, Any]) -> bool:
    caps = _list(entry.get("capabilities"))
    return "embedding" in caps and "completion" not in caps


def _try_lmstudio(p: _Prober, v1: _Answer, base: str, forced: bool = False) -> ServerInfo | str | None:
    api1, api0 = p.get("/api/v1/models", "/api/v0/models")
    express = v1.header("x-powered-by") == "express"
    new = [e for e in _list(_dict(api1.ok).get("models")) if isinstance(e, dict) and _str(e.get("key"))]
    if new or (express and isinstance(_dict(api1.ok).get("models"), list)):
        return ServerInfo(base, "lmstudio", "ready", None, [_lmstudio_v1_model(e) for e in new])
    old = [e for e in _entries(api0.ok) if "state" in e or "type" in e]
    if old or (express and isinstance(_dict(api0.ok).get("data"), list)):
        return ServerInfo(base, "lmstudio", "ready", None, [_lmstudio_v0_model(e) for e in old])
    entries = _entries(v1.ok)
    if express and entries and all(e.get("owned_by") == "organization_owner" for e in entries):
        return ServerInfo(base, "lmstudio", "ready", None, _openai_models(v1))
    return None


def _lmstudio_v1_model(e: dict[str, Any]) -> ModelInfo:
    instances = [i for i in _list(e.get("loaded_instances")) if isinstance(i, dict)]
    ctx = None
    if instances:
        ctx = _int(_dict(instances[0].get("config")).get("context_length"))
    key = str(e["key"])
    return ModelInfo(
        id=key,
        loaded=bool(instances),
        embedding=e.get("type") in ("embedding", "embeddings") or _embedding_by_name(key),
        context_length=ctx or _int(e.get("max_context_length")),
        quantization=_str(_dict(e.get("quantization")).get("name")) or _str(e.get("quantization")),
        size=_int(e.get("size_bytes")),
    )


def _lmstudio_v0_model(e: dict[str, Any]) -> ModelInfo:
    state = e.get("state")
    ident = str(e["id"])
    return ModelInfo(
        id=ident,
        loaded=(state == "loaded") if isinstance(state, str) else None,
        embedding=e.get("type") in ("embeddings", "embedding") or _embedding_by_name(ident),
        context_length=_int(e.get("loaded_context_length")) or _int(e.get("max_context_length")),
        quantization=_str(e.get("quantization")),
    )


def _try_llamacpp(p: _Prober, v1: _Answer, base: str, forced: bool = False) -> ServerInfo | str | None:
    props = p.one("/props")
    entries = _entries(v1.ok)
    props_data = _dict(props.ok)
    native = any(k in props_data for k in ("default_generation_settings", "build_info", "model_path"))
    signals = [
        "llama.cpp" in v1.header("server"),
        any(e.get("owned_by") == "llamacpp" or "meta" in e for e in entries),
        native,
        forced,
    ]
    if sum(signals) < 2:
        return None
    if props.status == 503:
        return ServerInfo(base, "llamacpp", "loading", None, [])
    router = any("status" in e for e in entries)
    ctx = quant = None
    # /props describes the one model of single-model mode (router mode needs ?model= for it).
    single = not router and len(entries) == 1
    if single:
        ctx = _int(_dict(props_data.get("default_generation_settings")).get("n_ctx")) or _int(
            props_data.get("n_ctx")
        )
        quant = _str(props_data.get("model_ftype"))
    # --sleep-idle-seconds: the model is unloaded until the next request wakes it (a few seconds
    # for a big model); the room should know it is not loaded, though it still answers.
    sleeping = props_data.get("is_sleeping") is True
    models = []
    for e in entries:
        ident = str(e["id"])
        status = _dict(e.get("status")).get("value")
        meta = _dict(e.get("meta"))
        models.append(
            ModelInfo(
                id=ident,
                # Single-model mode serves exactly the model it loaded at start-up, unless asleep.
                loaded=(status == "loaded") if router else not sleeping,
                embedding=_embedding_by_name(ident),
                # meta.n_ctx is the context a request gets (per slot); n_ctx_train is only the ceiling.
                context_length=_int(meta.get("n_ctx")) or ctx,
                quantization=_str(meta.get("ftype")) or (quant if single else None),
                size=_int(meta.get("size")),
            )
        )
    return ServerInfo(base, "llamacpp", "ready", _str(props_data.get("build_info")), models)


def _try_localai(p: _Prober, v1: _Answer, base: str, forced: bool = False) -> ServerInfo | str | None:
    readyz, version, tags, ps = p.get("/readyz", "/version", "/api/tags", "/api/ps")
    entries = _entries(v1.ok)
    tag_data = _dict(tags.ok)
    tag_entries = [e for e in _list(tag_data.get("models")) if isinstance(e, dict)]
    imitation = ("models" in tag_data and tag_data["models"] is None) or any(
        str(e.get("digest", "")).startswith("sha256:") for e in tag_entries
    )
    starting = readyz.status == 503 and "status" in _dict(readyz.data)
    ready = readyz.status == 200 and not readyz.body.strip()
    signals = [bool(entries) and all("owned_by" not in e for e in entries), imitation, starting or ready]
    if sum(signals) + forced < 2:
        return None
    by_name = {_strip_latest(str(e.get("name", ""))): e for e in tag_entries}
    ps_list = _dict(ps.ok).get("models", ...)
    # A LocalAI before its Ollama routes (Apr 2026) has no /api/ps: loaded stays unknown.
    running = None
    if ps_list is None or isinstance(ps_list, list):
        running = {_strip_latest(str(_dict(e).get("name", ""))) for e in _list(ps_list)}
    models = []
    for e in entries:
        ident = str(e["id"])
        tag = by_name.get(_strip_latest(ident), {})
        models.append(
            ModelInfo(
                id=ident,
                loaded=None if running is None else _strip_latest(ident) in running,
                embedding=_embedding_by_caps(tag) or _embedding_by_name(ident),
                quantization=_str(_dict(tag.get("details")).get("quantization_level")),
            )
        )
    ver = _str(_dict(version.ok).get("version"))
    return ServerInfo(base, "localai", "loading" if starting else "ready", ver, models)


def _try_vllm(p: _Prober, v1: _Answer, base: str, forced: bool = False) -> ServerInfo | str | None:
    version = p.one("/version")
    entries = _entries(v1.ok)
    ver = _str(_dict(version.ok).get("version"))
    shaped = any(e.get("owned_by") == "vllm" or "max_model_len" in e for e in entries)
    if ver is None or not shaped:
        return None
    models = [
        ModelInfo(
            id=str(e["id"]),
            # vLLM serves only what it loaded at start-up (base model and LoRA adapters).
            loaded=True,
            embedding=_embedding_by_name(str(e["id"])),
            context_length=_int(e.get("max_model_len")),
        )
        for e in entries
    ]
    return ServerInfo(base, "vllm", "ready", ver, _dedupe(models))


def _openai_models(v1: _Answer) -> list[ModelInfo]:
    return _dedupe(
        [ModelInfo(id=str(e["id"]), embedding=_embedding_by_name(str(e["id"]))) for e in _entries(v1.ok)]
    )


_TRY: dict[str, Callable[..., ServerInfo | str | None]] = {
    "ollama": _try_ollama,
    "lmstudio": _try_lmstudio,
    "llamacpp": _try_llamacpp,
    "localai": _try_localai,
    "vllm": _try_vllm,
}


def find_servers(
    http: httpx.Client | None = None,
    candidates: Sequence[str] = LOCAL_CANDIDATES,
    *,
    read_s: float = LOCAL_READ_S,
    deadline_s: float = SEARCH_DEADLINE_S,
) -> list[ServerInfo]:
    """The LLM servers answering at `candidates` (the usual local ports), in the order of `candidates`.

    Every address is probed at once, each within `read_s` per read and the whole search within
    `deadline_s`: a probe still running then is dropped (it ends by itself within one read). An
    address where nothing answers, or something that is not an LLM server (or wants a key), is skipped
    silently: this is a search, not a check. Without `http`, a client with a connection for every
    route of every candidate is used (a shared client's small pool would make the probes queue).
    """
    if not candidates:
        return []
    if http is None:
        with _search_client(len(candidates)) as own:
            return find_servers(own, candidates, read_s=read_s, deadline_s=deadline_s)

    def one(url: str) -> ServerInfo | None:
        try:
            return probe(http, url, read_s=read_s, deadline_s=deadline_s)
        except EndpointError:
            return None

    pool = ThreadPoolExecutor(max_workers=len(candidates), thread_name_prefix="llmroom-search")
    try:
        futures = [pool.submit(one, url) for url in candidates]
        # A little past the deadline: a probe that got its answers just in time still returns.
        wait_futures(futures, timeout=deadline_s + 0.1)
        found = [f.result() for f in futures if f.done() and not f.cancelled()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [s for s in found if s is not None]


def _search_client(count: int) -> httpx.Client:
    import ssl

    # Loopback http:// only: a bare TLS context costs nothing (certifi's bundle costs ~30 ms).
    return httpx.Client(
        limits=httpx.Limits(max_connections=8 * count, max_keepalive_connections=2 * count),
        verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT),
        follow_redirects=False,
    )


def probe_local(http: httpx.Client, candidates: Sequence[str] = LOCAL_CANDIDATES) -> list[ServerInfo]:
    """`find_servers` over `http` (kept for callers of the older name)."""
    return find_servers(http, candidates)


def ports_of(candidates: Sequence[str]) -> str:
    """ "11434, 1234, 8080": the ports of the searched addresses, for messages."""
    return ", ".join(str(urlsplit(u).port or u) for u in candidates)


def server_label(info: ServerInfo) -> str:
    """One line naming a found server: kind, version, URL and what it offers."""
    version = f" {info.version}" if info.version else ""
    chat = len(info.chat_models())
    offers = "loading a model" if info.status == "loading" else f"{chat} chat model{'s' * (chat != 1)}"
    return f"{info.kind}{version} at {info.url} ({offers})"


def match_server(answer: str, servers: Sequence[ServerInfo]) -> ServerInfo | None:
    """The server a typed answer names: its number in the list (1-based), its URL (with or without
    the scheme), its port, or its kind when only one server is of that kind; else None."""
    text = answer.strip().lower().rstrip("/")
    if not text:
        return None
    if text.isdigit() and 1 <= int(text) <= len(servers):
        return servers[int(text) - 1]
    for info in servers:
        url = info.url.lower()
        parts = urlsplit(url)
        if text in (url, url.split("://", 1)[1], str(parts.port), f":{parts.port}"):
            return info
    same_kind = [s for s in servers if s.kind == text]
    return same_kind[0] if len(same_kind) == 1 else None


def choose_server(
    servers: Sequence[ServerInfo],
    ask: Callable[[list[ServerInfo]], ServerInfo] | None = None,
    candidates: Sequence[str] = LOCAL_CANDIDATES,
) -> ServerInfo:
    """What `join` shares when no endpoint was given, from `find_servers(..., candidates)`.

    None found: EndpointError (exit 6) pointing to `llmroom probe`. One: it. Several: `ask(servers)`
    (a numbered pick on a terminal; see `match_server` for what it may accept), else EndpointError
    listing them.
    """
    if not servers:
        raise EndpointError(
            f"no LLM server answers on the usual local ports ({ports_of(candidates)})",
            "start one, see what answers with: llmroom probe, or pass --endpoint URL",
        )
    if len(servers) == 1:
        return servers[0]
    if ask is not None:
        return ask(list(servers))
    listing = "; ".join(server_label(s) for s in servers)
    raise EndpointError(
        f"{len(servers)} LLM servers answer on this machine: {listing}", "choose one with --endpoint URL"
    )


# -- choosing the model ---------------------------------------------------------------------------


def _same_model(requested: str, ident: str) -> bool:
    """`llama3.2` is Ollama's `llama3.2:latest` (and the other way round, for LocalAI's ids)."""
    return requested == ident or _strip_latest(requested) == _strip_latest(ident)


def _listing(models: list[ModelInfo]) -> str:
    return ", ".join(f"{m.id} (loaded)" if m.loaded else m.id for m in models) or "nothing"


def choose_model(
    info: ServerInfo,
    requested: str | None,
    ask: Callable[[list[ModelInfo]], ModelInfo] | None = None,
) -> ModelInfo:
    """The model to share, or EndpointError saying why none can be chosen.

    With `requested`: that model (exactly, or Ollama's `name` == `name:latest`). Without: the one
    loaded chat model, else the only chat model, else `ask(chat_models)`; embedding models are never
    chosen or offered.
    """
    if info.status == "loading":
        raise EndpointError(f"the LLM server at {info.url} is still loading a model", "wait, or pass --wait")
    chat = info.chat_models()
    if requested is not None:
        exact = [m for m in info.models if m.id == requested]
        match = exact or [m for m in info.models if _same_model(requested, m.id)]
        if not match:
            hint = f"ollama pull {requested}" if info.kind == "ollama" else "pass one of those with --model"
            raise EndpointError(
                f"the {info.kind} server at {info.url} does not serve model {requested!r};"
                f" it serves: {_listing(chat)}",
                hint,
            )
        if match[0].embedding:
            raise EndpointError(
                f"model {requested!r} at {info.url} is an embedding model and cannot chat;"
                f" chat models: {_listing(chat)}",
                "pass a chat model with --model",
            )
        return match[0]
    if not chat:
        what = "only embedding models" if info.models else "no models"
        raise EndpointError(
            f"the {info.kind} server at {info.url} has {what}, no chat model to share",
            _PULL_HINT.get(info.kind, _PULL_HINT["openai"]),
        )
    loaded = [m for m in chat if m.loaded]
    if len(loaded) == 1:
        return loaded[0]
    if len(chat) == 1:
        return chat[0]
    if ask is not None:
        return ask(chat)
    raise EndpointError(
        f"the {info.kind} server at {info.url} offers {len(chat)} chat models: {_listing(chat)}",
        "choose one with --model NAME",
    )


def llm_specs(info: ServerInfo, model: ModelInfo) -> dict[str, Any]:
    """What the room learns about the shared model: server kind and version, context, quantization."""
    out: dict[str, Any] = {"server": info.kind}
    extra = {
        "version": info.version,
        "context_length": model.context_length,
        "quantization": model.quantization,
        "loaded": model.loaded,
    }
    out.update({k: v for k, v in extra.items() if v is not None})
    return out
