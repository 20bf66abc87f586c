"""Limits a client meets at the door: body size (413), header and body pace (408), and huge text
that must not stall anyone else (tokenized off the event loop). Served as `python -m server` serves."""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest

from tests.conftest import LLAMA, live_server

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with live_server(tmp_path_factory.mktemp("limits"), as_main=True, model=LLAMA, max_body_bytes=LIMIT,
                     header_timeout_s=1, body_timeout_s=1) as s:
        yield s


def raw(srv, data: bytes, wait_s: float = 10) -> tuple[bytes, float]:
    """Send `data` on a fresh connection, read until the server closes it: (answer, seconds)."""
    url = urlparse(srv.url)
    t0 = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=wait_s) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer, time.monotonic() - t0


def status_and_error(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/completions"])
def test_declared_oversized_body_is_413_before_it_is_read_in_the_routes_error_shape(srv, path):
    head = (b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % (path.encode(), 10**9))
    answer = raw(srv, head + b'{"prompt": "')[0]  # 1 GB promised, a few bytes sent
    status, error = status_and_error(answer)
    assert status == 413
    if path == "/generate_stream":  # LoRAX's shape, which lorax-client reads
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error_type"] == "payload_too_large"
        message = error
    elif path.startswith("/v1/"):
        assert error["code"] == "payload_too_large" and error["type"] == "invalid_request_error"
        message = error["message"]
    else:
        assert error["type"] == "payload_too_large"
        message = error["message"]
    assert f"at most {LIMIT} bytes" in message and "1000000000" in message


def test_streamed_oversized_body_is_413_once_past_the_limit(srv):
    """Chunked, no Content-Length: counted while it arrives."""
    chunk = b"x" * 8192
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    status, error = status_and_error(raw(srv, head + body)[0])
    assert status == 413 and error["code"] == "payload_too_large" and f"at most {LIMIT} bytes" in error["message"]


def test_body_under_the_limit_is_served(srv):
    with srv.client() as c:
        r = c.post("/generate", json={"prompt": "a" * (LIMIT // 2), "max_new_tokens": 1})
    assert r.status_code == 400 and "the model's context" in r.json()["error"]["message"]  # read, parsed, tokenized


def test_slow_headers_get_408_and_the_server_keeps_serving(srv):
    answer, took = raw(srv, b"POST /generate HTTP/1.1\r\nhost: x\r\n")  # and then nothing more
    status, error = status_and_error(answer)
    assert status == 408 and error["type"] == "request_timeout" and "--header-timeout-s" in error["message"]
    assert 0.9 <= took < 5
    with srv.client() as c:
        assert c.get("/health").status_code == 200


@pytest.mark.parametrize(("path", "kind", "start"), [
    ("/generate", b"application/json", b'{"prompt":'), ("/adapters", b"multipart/form-data; boundary=b", b"--b\r\n")])
def test_a_body_that_stops_coming_gets_408_and_the_server_keeps_serving(srv, path, kind, start):
    """Its head complete, a few of its 100 bytes sent, then nothing: uploads (which stream under their
    own size limit) are bounded the same way."""
    head = b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: %s\r\ncontent-length: 100\r\n\r\n" % (path.encode(), kind)
    answer, took = raw(srv, head + start)
    status, error = status_and_error(answer)
    assert status == 408 and error["type"] == "request_timeout" and "--body-timeout-s" in error["message"], error
    assert 0.9 <= took < 5
    with srv.client() as c:
        assert c.get("/health").status_code == 200


def test_a_body_trickling_in_just_inside_each_wait_gets_408_once_its_time_is_up(srv):
    """A byte every 0.3 s of a 100-byte body never waits 1 s (--body-timeout-s) for the next, and
    would take 30 s: the whole body's time is bounded, not only each gap."""
    url = urlparse(srv.url)
    head = b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    t0 = time.monotonic()
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(head)
        while not select.select([s], [], [], 0.3)[0] and time.monotonic() - t0 < 10:
            s.sendall(b" ")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, error = status_and_error(answer)
    assert status == 408 and "whole within 1s (--body-timeout-s)" in error["message"], error
    assert time.monotonic() - t0 < 3


def test_idle_connection_is_closed_too(srv):
    answer, took = raw(srv, b"")
    assert status_and_error(answer)[0] == 408 and took < 5


def test_huge_text_does_not_stall_health(tmp_path):
    """24 texts of 252,000 characters, each just under what the context could hold (a longer one is refused
    by its length alone, test_door_validation), take seconds to tokenize; /health keeps answering meanwhile."""
    with live_server(tmp_path, as_main=True, model=LLAMA) as s:
        answers: list[httpx.Response] = []

        def huge():
            with httpx.Client(base_url=s.url, timeout=120) as c:
                answers.append(c.post("/tokenize", json={"prompt": "hello world " * 21_000}))

        callers = [threading.Thread(target=huge) for _ in range(24)]
        for caller in callers:
            caller.start()
        time.sleep(0.2)  # the bodies are read and tokenizing
        answered, slowest = 0, 0.0
        with httpx.Client(base_url=s.url, timeout=10) as c:
            while len(answers) < len(callers) and answered < 200:
                t0 = time.monotonic()
                assert c.get("/health").status_code == 200
                slowest = max(slowest, time.monotonic() - t0)
                answered += 1
                time.sleep(0.05)
        for caller in callers:
            caller.join(120)
        assert [(r.status_code, r.json()["count"]) for r in answers] == [(200, 105_001)] * len(callers)
        assert answered >= 3 and slowest < 1.0, (answered, slowest)


def test_oversized_headers_get_431(srv):
    """A head still incomplete past 64 KiB, sent in pieces as they are read: refused, not buffered."""
    url = urlparse(srv.url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        for _ in range(64):  # up to 1 MiB of headers
            s.sendall(b"x-pad: " + b"a" * 16384 + b"\r\n")
            if select.select([s], [], [], 0.05)[0]:
                break
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status, error = status_and_error(answer)
    assert status == 431 and error["type"] == "headers_too_large"


def _answers(srv) -> dict[tuple[str, str, str], float]:
    text = httpx.get(f"{srv.url}/metrics").text
    return {(s.labels["method"], s.labels["route"], s.labels["code"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "hotswap_http_responses"
            for s in family.samples if s.name == "hotswap_http_responses_total"}


def test_every_answer_is_counted_by_route_and_code_refusals_at_the_door_too(srv):
    before = _answers(srv)
    head = b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    assert status_and_error(raw(srv, head % 10**9)[0])[0] == 413  # refused before routing
    with srv.client() as c:
        assert c.get("/adapters/nope").status_code == 404
        assert c.get("/nowhere").status_code == 404
        assert c.post("/generate", content=b'{"prompt": ', headers={"content-type": "application/json"}).status_code == 400
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 1}).status_code == 200
    after = _answers(srv)
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert {k: v for k, v in moved.items() if k[1] != "/metrics"} == {
        ("POST", "/v1/completions", "413"): 1, ("GET", "/adapters/{name}", "404"): 1, ("GET", "unmatched", "404"): 1,
        ("POST", "/generate", "400"): 1, ("POST", "/generate", "200"): 1}


def test_bytes_that_are_not_http_get_400_json_and_are_counted(srv):
    before = _answers(srv)
    answer, _ = raw(srv, b"\x16\x03\x01 hello\r\n\r\n")  # a TLS hello, say, on the plain port
    status, error = status_and_error(answer)
    assert status == 400 and error["type"] == "invalid_request" and "HTTP/1.1 request" in error["message"], error
    assert b"application/json" in answer.partition(b"\r\n\r\n")[0]
    assert status_and_error(raw(srv, b"POST /generate HTTP/1.1\r\nhost: x\r\n")[0])[0] == 408
    assert raw(srv, b"PROPFIND /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")[0].startswith(
        b"HTTP/1.1 405")
    after = _answers(srv)
    moved = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert {k: v for k, v in moved.items() if k[1] != "/metrics"} == {
        ("other", "unmatched", "400"): 1, ("other", "unmatched", "408"): 1, ("other", "/health", "405"): 1}


def test_an_answer_before_the_body_is_read_closes_the_connection(srv):
    """A 404 after the head alone: the body's bytes still coming are not read as the next request's head."""
    head = b"POST /nope HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (LIMIT // 2)
    answer, _ = raw(srv, head + b"x" * 1000)  # read until the server closes the connection
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 404"), answer[:300]
    assert b"connection: close" in answer.lower()


@pytest.mark.parametrize("path", ["/v1/completions", "/adapters"])
def test_a_body_still_arriving_at_the_shutdown_deadline_gets_503_json(tmp_path, path):
    """Not uvicorn's plain-text 500 when it cancels the handler after its grace period (an upload too)."""
    with live_server(tmp_path, as_main=True, model=LLAMA, shutdown_timeout_s=1, body_timeout_s=30) as s:
        url = urlparse(s.url)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            kind, start = ((b"multipart/form-data; boundary=b", b"--b\r\n") if path == "/adapters"
                           else (b"application/json", b'{"prompt": '))
            sock.sendall(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-type: %s\r\ncontent-length: 1000\r\n\r\n%s"
                         % (path.encode(), kind, start))
            time.sleep(0.3)
            s.server.should_exit = True
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    status, error = status_and_error(answer)
    assert status == 503 and "shutting_down" in json.dumps(error), answer
