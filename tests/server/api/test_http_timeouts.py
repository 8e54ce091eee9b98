"""The HTTP front against slow and idle clients, over raw sockets to a real server.

A connection must complete each request's line and headers within --http-header-timeout seconds
(from the connection, or from the request's first byte on a kept-alive one), or it is answered
408 and closed; a connection idle between requests is closed after --http-idle-timeout seconds.
Neither cuts off a slow body upload or a long streamed response: only the head is timed. Before
these flags, aiohttp's only timer was its 3630 s keep-alive, and a client sending a header byte a
minute kept its connection for an hour. Also here: a request body nested 100,000 deep, or holding
an integer of 5,000 digits, is a 400 in OpenAI's shape, not a 500 from a RecursionError or a
ValueError.
"""
from __future__ import annotations

import json
import select
import socket
import time

import pytest

from loraplex.clients.client import Client

HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.5
SLACK = 1.0  # the event loop's and the machine's lateness, at most


@pytest.fixture(scope="module")
def server(module_server_factory, long_model):
    return module_server_factory("--http-port", "0", "--http-header-timeout", str(HEADER_TIMEOUT),
                                 "--http-idle-timeout", str(IDLE_TIMEOUT), "--max-new-tokens-limit", "2000",
                                 model=long_model, name="http-timeouts")


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def base_model(server) -> str:
    with Client(server.target) as client:
        return client.server_info()["model"]


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed (monotonic)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic()
        data += chunk


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One response with a Content-Length body, leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"closed mid-response: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail("closed mid-body")
    return int(head.split()[1]), body


def request(method: str, path: str, body: bytes = b"") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: loraplex\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_half_a_request_line_is_answered_408_and_closed_within_the_header_timeout(server):
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/compl")
        data, closed = until_closed(sock)
    assert HEADER_TIMEOUT - 0.05 <= closed - started <= HEADER_TIMEOUT + SLACK, closed - started
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout"), data
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert f"did not arrive within {HEADER_TIMEOUT:g} seconds (the server's --http-header-timeout)" in error["message"]


def test_a_header_byte_at_a_time_does_not_move_the_deadline(server):
    """Slowloris: bytes keep coming, the head never ends; the deadline counts from the start."""
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: loraplex\r\n")
        while not select.select([sock], [], [], 0.05)[0] and time.monotonic() - started < HEADER_TIMEOUT + SLACK + 1:
            sock.sendall(b"X")  # until the server answers: a byte sent after its close would reset the answer
        data, closed = until_closed(sock)
    assert closed - started <= HEADER_TIMEOUT + SLACK, closed - started
    assert data.startswith(b"HTTP/1.1 408"), data


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(server):
    with connect(server) as sock:
        started = time.monotonic()
        data, closed = until_closed(sock)
    assert data == b"" and HEADER_TIMEOUT - 0.05 <= closed - started <= HEADER_TIMEOUT + SLACK


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(server):
    """Between requests the idle timeout applies, not the header one: a second request sent
    after more than the header timeout is served on the same connection."""
    with connect(server) as sock:
        sock.sendall(request("GET", "/v1/models"))
        assert read_response(sock)[0] == 200
        time.sleep(HEADER_TIMEOUT + 0.3)
        sock.sendall(request("GET", "/v1/models"))
        status, body = read_response(sock)
        assert status == 200 and json.loads(body)["object"] == "list"
        answered = time.monotonic()
        data, closed = until_closed(sock)
    assert data == b"" and IDLE_TIMEOUT - 0.05 <= closed - answered <= IDLE_TIMEOUT + SLACK, closed - answered


def test_a_slow_body_upload_is_not_timed(server):
    body = json.dumps({"model": base_model(server), "prompt": "the quick brown fox", "max_tokens": 4,
                       "temperature": 0}).encode()
    with connect(server) as sock:
        sock.sendall(request("POST", "/v1/completions", body)[: -len(body)])
        for i in range(0, len(body), 8):  # the whole body over about 3x the header timeout
            sock.sendall(body[i : i + 8])
            time.sleep(3 * HEADER_TIMEOUT / (len(body) / 8))
        status, answer = read_response(sock)
    assert status == 200, answer
    assert json.loads(answer)["choices"][0]["finish_reason"] == "length"


def test_a_long_running_stream_is_not_cut_off(server):
    """A completion whose generation itself takes longer than the header timeout."""
    body = json.dumps({"model": base_model(server), "prompt": "the quick brown fox", "max_tokens": 1500,
                       "temperature": 0, "stream": True, "ignore_eos": True}).encode()
    with connect(server) as sock:
        started = time.monotonic()
        sock.sendall(request("POST", "/v1/completions", body))
        data = b""
        while b"data: [DONE]" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed mid-stream after {time.monotonic() - started:.2f}s: {data[-300:]!r}"
            data += chunk
        took = time.monotonic() - started
    assert took > HEADER_TIMEOUT, f"generation took {took:.2f}s, too fast to show anything: raise max_tokens"
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in data.split(b"\n")
                if line.startswith(b"data: {")]
    assert finishes[-1] == "length"


def test_a_deeply_nested_body_is_a_400_in_openais_shape(server):
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt":' * 100_000 + b"1" + b"}" * 100_000):
        with connect(server) as sock:
            sock.sendall(request("POST", "/v1/completions", body))
            status, answer = read_response(sock)
        error = json.loads(answer)["error"]
        assert status == 400 and error["code"] == "invalid_argument", answer[:500]
        assert error["message"] == "the request body is nested deeper than 64 levels (the limit)"


def test_an_integer_of_5000_digits_in_a_body_is_a_400(server):
    body = b'{"model": "m", "prompt": "x", "seed": ' + b"7" * 5000 + b"}"
    with connect(server) as sock:
        sock.sendall(request("POST", "/v1/completions", body))
        status, answer = read_response(sock)
    error = json.loads(answer)["error"]
    assert status == 400 and error["message"] == "the request body holds an integer of 5000 digits (the limit is 100)"


def test_the_flags_default_and_must_be_positive(server_factory):
    from loraplex.server.api.serve import build_parser

    args = build_parser().parse_args([])
    assert (args.http_header_timeout, args.http_idle_timeout) == (10.0, 75.0)
    with pytest.raises(RuntimeError, match=r"error: --http-header-timeout must be a positive number of seconds, "
                                           r"not 0.0"):
        server_factory("--http-port", "0", "--http-header-timeout", "0", name="bad-timeout")
