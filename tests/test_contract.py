"""The pure parts of the span contract: canonical envelopes, hashing, header and body redaction."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st

from tracetape.instrumentation import contract, redaction


def _env(body: bytes, headers=(), path="/v1/chat/completions", query="") -> str:
    return contract.envelope_hash(contract.http_envelope("post", path, query, headers, body))


def test_key_order_and_whitespace_do_not_change_the_hash() -> None:
    a = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    b = b'{ "messages" : [ {"content":"hi", "role":"user"} ],\n "model":"m" }'
    assert _env(a) == _env(b)


def test_one_character_and_array_order_change_the_hash() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "yo"}]}
    changed = json.loads(json.dumps(base))
    changed["messages"][0]["content"] = "hj"
    swapped = json.loads(json.dumps(base))
    swapped["messages"].reverse()
    h = _env(json.dumps(base).encode())
    assert h != _env(json.dumps(changed).encode())
    assert h != _env(json.dumps(swapped).encode())


def test_only_semantic_headers_count() -> None:
    body = b'{"a":1}'
    plain = _env(body, [("Content-Type", "application/json")])
    assert plain == _env(body, [("authorization", "Bearer sk-x"), ("x-stainless-retry-count", "2"),
                                ("traceparent", "00-ab-cd-01"), ("idempotency-key", "k"), ("date", "now")])
    assert plain != _env(body, [("anthropic-version", "2023-06-01")])
    assert _env(body, [("Anthropic-Beta", "x")]) == _env(body, [("anthropic-beta", "x")])


def test_path_and_query_normalisation() -> None:
    body = b"{}"
    assert _env(body, path="/v1//chat/completions/") == _env(body, path="/v1/chat/completions")
    assert _env(body, query="b=2&a=1") == _env(body, query="a=1&b=2")
    assert _env(body, query="a=1") != _env(body)


def test_non_json_body_hashes_its_bytes_and_empty_is_null() -> None:
    env = contract.http_envelope("GET", "/x", "", [], b"not json")
    assert set(env["body"]) == {"$sha256"}
    assert contract.http_envelope("GET", "/x", "", [], b"")["body"] is None
    assert _env(b"not json") != _env(b"not json!")


def test_canonical_bytes_are_sorted_and_compact() -> None:
    env = contract.tool_envelope("search", {"b": 1, "a": [2, 1]})
    assert contract.canonical_bytes(env) == b'{"arguments":{"a":[2,1],"b":1},"kind":"tool","name":"search","v":1}'


def test_redaction_masks_same_length_and_drops_credential_headers() -> None:
    body = b'{"note":"my key is sk-test-ABCDEFGHIJKLMNOPQRSTUVWX ok"}'
    red = redaction.redact_body(body)
    assert len(red) == len(body) and b"ABCDEFGHIJ" not in red and red.startswith(b'{"note":"my key is sk-t***')
    assert json.loads(red)  # still valid JSON
    headers = redaction.drop_secret_headers(
        [("Authorization", "Bearer sk-test-1234567890abcdefghij"), ("X-Api-Key", "k"), ("Cookie", "c"),
         ("Content-Type", "application/json")]
    )
    assert headers == [("content-type", "application/json")]


def test_provider_detection_and_span_names() -> None:
    assert contract.detect_provider("api.anthropic.com", []) == "anthropic"
    assert contract.detect_provider("127.0.0.1", [("anthropic-version", "2023-06-01")]) == "anthropic"
    assert contract.detect_provider("127.0.0.1", [("User-Agent", "OpenAI/Python 3.54.0")]) == "openai"
    assert contract.detect_provider("127.0.0.1", [("User-Agent", "AsyncOpenAI/Python 3.54.0")]) == "openai"
    assert contract.detect_provider("example.com", []) is None
    assert contract.step_span_name(contract.STEP_KIND_MODEL, model="gpt-4o") == "chat gpt-4o"
    assert contract.step_span_name(contract.STEP_KIND_TOOL, tool="search") == "execute_tool search"
    assert contract.is_model_path("/v1/chat/completions") and not contract.is_model_path("/v1/models")


def test_request_model_reads_what_the_parsed_body_names() -> None:
    """`request_model` decodes only the `model` member; it answers what parsing the whole body answers."""
    bodies = [b"", b"x", b"[]", b"{}", b'"model"', b'{"Model": "m"}', b'{"model": null}', b'{"model": 1}',
              b'{"model": "m"}', b' {"model" : "m" } ', b'{"model": "a", "model": "b"}', b'{"model": "m"} x',
              b'{"model": "m",}', b'\xef\xbb\xbf{"model": "m"}', b'{"model": "\\ud800"}', b'{"model": "m", "x": NaN}',
              b'{"a": 123456789012345678901234567890, "model": "m"}', b"[" * 100_000 + b"]" * 100_000,
              b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "m"}',
              json.dumps({"messages": [{"role": "user", "content": "é \u2028"}], "model": "gpt-4o",
                          "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}).encode(),
              json.dumps({"model": {"name": "m"}}).encode(), json.dumps([{"model": "m"}]).encode()]
    for body in bodies:
        assert contract.request_model(body) == contract.model_of(contract.canonical_body(body)), body[:60]
    assert contract.request_model(bodies[-3]) == "gpt-4o"


def test_credentials_are_known_by_their_names() -> None:
    """Headers and query parameters whose names say they hold a credential are masked whatever the value."""
    for name in ("authorization", "x-api-key", "x-rapidapi-key", "ocp-apim-subscription-key", "x-subscription-token",
                 "private-token", "x-auth-token", "x-goog-api-key", "x-csrf-token", "x-client-secret"):
        assert redaction.is_secret_header(name), name
    for name in ("idempotency-key", "sec-websocket-key", "x-ratelimit-remaining-tokens", "content-type",
                 "anthropic-version", "openai-beta", "www-authenticate", "x-request-id", "x-stainless-retry-count"):
        assert not redaction.is_secret_header(name), name
    assert redaction.drop_secret_headers([("X-RapidAPI-Key", "0f1e2d3c"), ("Accept", "*/*")]) == [("accept", "*/*")]
    url = "https://h/v1/x?q=1&api_key=0f1e2d3c4b5a&Access_Token=ya29.abc&page_token=next&monkey=2&sig=a%2Bb"
    assert redaction.redact_text(url) == (
        "https://h/v1/x?q=1&api_key=************&Access_Token=********&page_token=next&monkey=2&sig=*****")
    assert redaction.redact_text("run --password=hunter2 --tokenizer=x") == "run --password=******* --tokenizer=x"
    for name in ("X-Amz-Signature", "x_amz_signature", "x-amz-security-token", "X_AMZ_SECURITY_TOKEN",
                 "x-goog-credential", "X_GOOG_CREDENTIAL", "client_secret", "API-KEY", "subscription-key"):
        assert redaction.is_secret_param(name), name
    assert contract.canonical_query("api_key=abc&q=1&KEY=&page_token=p") == [
        ["KEY", "***"], ["api_key", "***"], ["page_token", "p"], ["q", "1"]]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["key", "api_key", "API-KEY", "access_token", "page_token", "monkey", "q",
                                           "sig", "x-amz-signature", "token", "tokenizer", "a;key", "key2"]),
                          st.text(max_size=24)), max_size=6))
def test_the_stored_url_rebuilds_the_envelope_recording_hashed(pairs: list[tuple[str, str]]) -> None:
    """The URL is stored redacted (`redact_text`); the replayer rebuilds the recorded envelope from it: the same
    hash as the envelope recording computed from the URL as sent. No credential parameter's value is stored."""
    query = urlencode(pairs)
    sent = contract.http_envelope("GET", "/v1/x", query, [], b"")
    stored = urlsplit(redaction.redact_text(f"https://h/v1/x?{query}"))
    rebuilt = contract.http_envelope("GET", stored.path, stored.query, [], b"")
    assert contract.envelope_hash(rebuilt) == contract.envelope_hash(sent)
    for name, value in parse_qsl(stored.query, keep_blank_values=True):
        if redaction.is_secret_param(name) and value:
            assert set(value) == {"*"}, (name, value)  # stored masked, whatever it was


def test_a_compressed_body_read_only_in_part_is_scanned_as_far_as_it_decodes() -> None:
    """A gzip/deflate/zstd response the application stopped reading is a prefix of a stream: it is inflated as
    far as it goes, and a secret in that part is masked (stored decoded); without one the bytes are kept."""
    import zlib

    import zstandard

    secret = "sk-" + "C" * 40
    text = json.dumps({"echo": secret, "pad": "x" * 2000}).encode()
    plain = json.dumps({"echo": "nothing here", "pad": "x" * 2000}).encode()

    def gzip_prefix(data: bytes) -> bytes:
        c = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)  # no end of stream: cut where the reader stopped

    def deflate_prefix(data: bytes) -> bytes:
        c = zlib.compressobj(9)
        return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)

    def zstd_prefix(data: bytes) -> bytes:
        c = zstandard.ZstdCompressor().compressobj()
        return c.compress(data) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)  # blocks so far, no frame end

    for coding, prefix in (("gzip", gzip_prefix), ("deflate", deflate_prefix), ("zstd", zstd_prefix)):
        body, encoding = redaction.redact_encoded(prefix(text), coding)
        assert encoding == "" and secret.encode() not in body and b"sk-C" in body, coding
        cut = prefix(plain)
        assert redaction.redact_encoded(cut, coding) == (cut, coding), coding  # nothing to mask: bytes kept
    garbage = b"\x1f\x8b not really gzip"
    assert redaction.redact_encoded(garbage, "gzip") == (garbage, "gzip")
