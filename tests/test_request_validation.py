"""Hostile requests against a real server (issue 23): each gets an OpenAI-shaped 4xx naming the
field, never a 5xx, and the engine keeps serving; bodies over --max-request-bytes get 413 before
they are read, after the API key; long prompts are tokenized off the event loop."""

import json
import socket
import threading
import time

import httpx
import pytest
from server_harness import MODEL_NAME, RunningServer

from ropeway.engine import AsyncLLM
from ropeway.server.header_timeout import HeaderTimeoutProtocol

MAX_NUM_SEQS = 4
MAX_WAITING = 4
MAX_REQUEST_BYTES = 4 << 20
COMPLETION = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def engine(make_llm):
    llm = make_llm(max_model_len=512, max_num_seqs=MAX_NUM_SEQS, kv_cache_memory_bytes=32 << 20)
    async_engine = AsyncLLM.in_thread(llm.engine)
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(engine, max_waiting=MAX_WAITING, max_request_bytes=MAX_REQUEST_BYTES) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as session:
        yield session


def post_raw(http: httpx.Client, path: str, body: bytes) -> httpx.Response:
    return http.post(path, content=body, headers={"content-type": "application/json"})


def assert_refused(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
    return error


def assert_engine_serves(http: httpx.Client) -> None:
    assert http.get("/health").status_code == 200
    reply = http.post("/v1/completions", json=COMPLETION)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"


# Item 1: values that stopped the engine for good.
@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"top_k": 9223372036854775808}, "top_k"),
    ("/v1/completions", {"top_k": 9223372036854775807}, "top_k"),
    ("/v1/completions", {"rope_scaling": {"rope_type": "ntk", "factor": 1e35}}, "rope_scaling.factor"),
    ("/v1/completions", {"rope_scaling": {"rope_type": "yarn", "factor": 1e35}}, "rope_scaling.factor"),
    ("/v1/completions", {"rope_scaling": {"rope_type": "linear", "factor": 1e39}}, "rope_scaling.factor"),
    ("/v1/chat/completions", {"seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"n": 2**63}, "n"),
    ("/v1/completions", {"context_policy": {"type": "sink_window", "window": 2**70}}, "context_policy.window"),
    ("/v1/completions", {"rope_scaling": {"rope_type": "dynamic", "factor": 2,
                                          "original_max_position_embeddings": 2**70}},
     "rope_scaling.original_max_position_embeddings"),
])
def test_values_that_once_stopped_the_engine_get_400_naming_the_field(http, path, extra, param):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), **extra}
    assert_refused(http.post(path, json=body), 400, param)
    assert_engine_serves(http)


# Item 2: 500s that are the client's fault.
@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2, "echo": true}', "prompt"),
    ("/v1/completions", b'{"prompt": ["ok", "a\\udc00"], "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages.0.content"),
    ("/tokenize", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/completions", b'{"model": "a\\ud800b", "prompt": "x"}', "model"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["\\udfff"]}', "stop"),
])
def test_lone_surrogates_get_400_naming_the_field(http, path, raw, param):
    error = assert_refused(post_raw(http, path, raw), 400, param)
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("factor", [1e305, 1e308])
def test_an_enormous_rope_factor_gets_400(http, factor):
    body = {**COMPLETION, "rope_scaling": {"rope_type": "linear", "factor": factor}}
    assert_refused(http.post("/v1/completions", json=body), 400, "rope_scaling.factor")


@pytest.mark.parametrize("rope_type", [["ntk"], {"ntk": 1}])
def test_a_rope_type_that_is_a_list_or_object_gets_400(http, rope_type):
    body = {**COMPLETION, "rope_scaling": {"rope_type": rope_type, "factor": 2}}
    assert_refused(http.post("/v1/completions", json=body), 400, "rope_scaling.rope_type")


# Item 4: a request that can never fit is the client's error, not "retry".
def test_a_request_needing_more_sequences_than_the_server_holds_gets_400(http):
    body = {**COMPLETION, "prompt": ["a"] * 10, "n": 2}  # 20 sequences > 4 running + 4 waiting
    error = assert_refused(http.post("/v1/completions", json=body), 400, "n")
    assert "at most 8" in error["message"]
    many = {**COMPLETION, "prompt": ["a"] * (MAX_NUM_SEQS + MAX_WAITING + 1)}
    assert_refused(http.post("/v1/completions", json=many), 400, "prompt")


# Item 6: loose coercion, unbounded lists.
@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"prompt": [True, False]}, "prompt"),
    ("/v1/completions", {"temperature": "0.5"}, "temperature"),
    ("/v1/completions", {"stream": 1}, "stream"),
    ("/v1/chat/completions", {"add_generation_prompt": 0}, "add_generation_prompt"),
    ("/v1/completions", {"stop": ["x" * 1_000_000]}, "stop"),
    ("/v1/completions", {"stop": ["x"] * 17}, "stop"),
    ("/v1/completions", {"stop_token_ids": list(range(100_000))}, "stop_token_ids"),
])
def test_values_of_the_wrong_type_or_size_get_400(http, path, extra, param):
    body = {**(COMPLETION if path == "/v1/completions" else CHAT), **extra}
    assert_refused(http.post(path, json=body), 400, param)


# Item 7: an empty body names what is missing.
def test_an_empty_body_names_the_body(http):
    error = assert_refused(post_raw(http, "/v1/completions", b""), 400, "body")
    assert "body" in error["message"]


def test_a_body_over_the_limit_gets_413_before_it_is_read(http, server):
    big = json.dumps({**COMPLETION, "prompt": "x" * (MAX_REQUEST_BYTES + 1)}).encode()
    response = post_raw(http, "/v1/completions", big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is found while reading
        for start in range(0, len(big), 1 << 16):
            yield big[start : start + (1 << 16)]

    chunked = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413
    assert_engine_serves(http)


def test_the_api_key_is_checked_before_the_body_size(engine):
    with RunningServer(engine, api_key="sesame", max_request_bytes=1024) as keyed:
        big = json.dumps({**COMPLETION, "prompt": "x" * 4096})
        with httpx.Client(base_url=keyed.url, timeout=60) as http:
            assert post_raw(http, "/v1/completions", big.encode()).status_code == 401
            authorized = http.post("/v1/completions", content=big, headers={"Authorization": "Bearer sesame"})
            assert authorized.status_code == 413
            assert http.get("/health").status_code == 200  # not behind the key


def test_a_long_prompt_is_tokenized_off_the_event_loop(http):
    """While a 1.2 MB prompt is tokenized (seconds on this CPU) the event loop keeps answering."""
    replies = []
    done = threading.Event()

    def long_prompt():
        body = {**COMPLETION, "prompt": "The quick brown fox jumps over the lazy dog. " * 27_000}
        replies.append(http.post("/v1/completions", json=body))
        done.set()

    worker = threading.Thread(target=long_prompt)
    worker.start()
    answered_meanwhile = 0
    with httpx.Client(base_url=http.base_url, timeout=60) as health:
        while not done.is_set():
            answered_meanwhile += health.get("/health").status_code == 200 and not done.is_set()
    worker.join()
    assert_refused(replies[0], 400, "prompt")  # longer than the 512-token context
    assert answered_meanwhile >= 5


def raw_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(request)
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    return reply


def test_an_http_1_0_client_asking_for_a_stream_gets_a_reply_it_can_read(server):
    body = json.dumps({**COMPLETION, "max_tokens": 3, "stream": True}).encode()
    reply = raw_exchange(server.port, b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, payload = reply.partition(b"\r\n\r\n")
    headers = [line.split(b":", 1)[0].strip().lower() for line in head.split(b"\r\n")[1:]]
    assert b"transfer-encoding" not in headers
    assert headers.count(b"connection") == 1
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    assert int(length[0].split(b":")[1]) == len(payload)
    assert payload.rstrip().endswith(b"data: [DONE]")


class QuickHeaderTimeout(HeaderTimeoutProtocol):
    header_timeout = 1.0


def test_a_connection_that_sends_its_headers_too_slowly_is_closed(engine):
    with RunningServer(engine, http_protocol=QuickHeaderTimeout) as quick:
        with socket.create_connection(("127.0.0.1", quick.port), timeout=30) as slow:
            slow.sendall(b"GET /health HTTP/1.1\r\n")  # ... and never the rest of the head
            started = time.monotonic()
            assert slow.recv(1024) == b""  # closed by the server, no reply
            assert time.monotonic() - started < 20
        # A client that sends its head in time is served on the same server.
        reply = raw_exchange(quick.port, b"GET /health HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
