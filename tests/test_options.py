"""Parsing user input: room codes, hub URLs, generation config (all exit 2, before any request)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmroom_cli.errors import UsageError
from llmroom_cli.options import normalize_hub_url, parse_config, parse_room_code

CODE_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("abc123", "ABC123"),
        ("ABC123", "ABC123"),
        ("-YLUHJ", "-YLUHJ"),
        ("a_b-c1", "A_B-C1"),
        (" xyz789 ", "XYZ789"),
    ],
)
def test_room_codes_are_normalised_to_upper_case(raw: str, expected: str) -> None:
    assert parse_room_code(raw) == expected


@pytest.mark.parametrize("raw", ["", "ABC12", "ABC1234", "ABC 12", "ABC12!", "ÄBC123", "abc/12"])
def test_bad_room_codes_are_usage_errors(raw: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_room_code(raw)
    assert info.value.exit_code == 2
    assert "6 characters" in info.value.message


@given(st.text(alphabet=CODE_ALPHABET, min_size=6, max_size=6))
def test_every_reference_code_is_accepted(code: str) -> None:
    assert parse_room_code(code) == code.upper()


@given(st.text(max_size=12))
def test_code_parsing_never_crashes(text: str) -> None:
    try:
        out = parse_room_code(text)
    except UsageError:
        return
    assert len(out) == 6 and all(c in CODE_ALPHABET.upper() for c in out)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("localhost:3000", "http://localhost:3000"),
        ("http://hub.lan:3000/", "http://hub.lan:3000"),
        ("https://hub.example/base/", "https://hub.example/base"),
        ("10.0.0.5:80", "http://10.0.0.5:80"),
        ("localhost", "http://localhost:3000"),
        ("[::1]", "http://[::1]:3000"),
    ],
)
def test_hub_urls(raw: str, expected: str) -> None:
    assert normalize_hub_url(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ftp://hub:3000",
        "http://",
        "http://hub:notaport",
        "http://hub:99999",
        "http://u:p@hub:1",
        "http://h/?q=1",
    ],
)
def test_bad_hub_urls(raw: str) -> None:
    with pytest.raises(UsageError):
        normalize_hub_url(raw)


def test_config_values_are_typed() -> None:
    cfg = parse_config(
        ["temperature=0.7", "max_tokens=2048", 'stop=["\\n"]', "mirostat=2", "name=plain text"]
    )
    assert cfg == {
        "temperature": 0.7,
        "max_tokens": 2048,
        "stop": ["\n"],
        "mirostat": 2,
        "name": "plain text",
    }
    assert isinstance(cfg["max_tokens"], int)


def test_no_config_is_none() -> None:
    assert parse_config([]) is None


@pytest.mark.parametrize(
    "pair",
    [
        "temperature=2.5",
        "temperature=-0.1",
        "top_p=1.5",
        "max_tokens=0",
        "max_tokens=1.5",
        "frequency_penalty=3",
        "presence_penalty=-2.1",
        "seed=abc",
        "temperature=hot",
        "stop=[1,2]",
        "noequals",
        "=1",
    ],
)
def test_out_of_range_config_is_a_usage_error(pair: str) -> None:
    with pytest.raises(UsageError):
        parse_config([pair])


def test_config_file_json_and_toml_with_pairs_winning(tmp_path: Path) -> None:
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"temperature": 0.2, "top_p": 0.9}))
    assert parse_config(["temperature=0.5"], j) == {"temperature": 0.5, "top_p": 0.9}
    t = tmp_path / "c.toml"
    t.write_text('temperature = 1.0\nstop = ["END"]\nmax_tokens = 64\n')
    assert parse_config([], t) == {"temperature": 1.0, "stop": ["END"], "max_tokens": 64}


@pytest.mark.parametrize(("name", "text"), [("bad.json", "{nope"), ("list.json", "[1]"), ("bad.toml", "= =")])
def test_bad_config_files(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError):
        parse_config([], path)
    with pytest.raises(UsageError):
        parse_config([], tmp_path / "missing.json")


def test_credentials_in_a_url_are_refused_and_never_echoed() -> None:
    with pytest.raises(UsageError) as info:
        normalize_hub_url("http://bob:pw123@hub.lan:3000")
    assert "pw123" not in str(info.value) and "not supported" in str(info.value)


def test_a_value_that_looks_like_json_must_be_json() -> None:
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_config(['stop=["\\n"'])


@pytest.mark.parametrize(
    ("typed", "url"),
    [
        ("h", "http://h:3000"),
        ("t", "http://t:3000"),
        ("p", "http://p:3000"),
        ("http", "http://http:3000"),
        ("hub.lan", "http://hub.lan:3000"),
        ("h:4000", "http://h:4000"),
        ("[::1]", "http://[::1]:3000"),
        ("10.0.0.5/base/", "http://10.0.0.5:3000/base"),
        ("https://h", "https://h"),
        ("http://t:3000/", "http://t:3000"),
    ],
)
def test_hub_urls_are_built_from_their_parts(typed: str, url: str) -> None:
    assert normalize_hub_url(typed) == url


@pytest.mark.parametrize(
    ("typed", "url"),
    [("h", "http://h"), ("t:11434", "http://t:11434"), ("p/v1", "http://p"), ("http", "http://http")],
)
def test_endpoint_urls_are_built_from_their_parts(typed: str, url: str) -> None:
    from llmroom_cli.endpoints import normalize_endpoint, probe_url

    assert normalize_endpoint(typed) == url
    assert probe_url("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert probe_url("[::]:8080") == "http://[::1]:8080"


def test_an_unclosed_ipv6_bracket_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="invalid hub URL"):
        normalize_hub_url("http://[::1")


def test_a_config_file_is_bounded_in_size_and_depth(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_text('{"stop": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(UsageError, match="larger than"):
        parse_config([], big)
    deep = tmp_path / "deep.json"
    deep.write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UsageError, match="nested too deeply"):
        parse_config([], deep)
