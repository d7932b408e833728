"""The tool server's HTTP framing (server.py, RFC 7230), over raw sockets on loopback.

A request's body length is never in doubt: Content-Length is one value of plain ASCII digits, never
beside Transfer-Encoding, in headers that are all `name: value`; otherwise 400 and the connection is
closed, so no byte of the body is ever read as a next request. `Expect: 100-continue` is answered
"100 Continue" only for a body the server will read. An absolute-form target routes by its path.
Headers that stop before their blank line are closed after the read timeout, without an answer.
"""
import json
import time

import pytest

from harness import server
from test_server import CITY, FORECAST, assert_still_serves, connect, direct, raw_exchange

BODY = json.dumps(FORECAST).encode().ljust(159)  # 159 bytes (JSON allows trailing spaces): "+159" is int 159
ANSWER = direct("SkyCast", "forecast", {"city": CITY})


def post(*header_lines, body=BODY, target="/virtual"):
    """A raw POST with these header lines after Host and `Connection: close` (so that an answered
    request ends its connection at once)."""
    head = f"POST {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n" + "".join(h + "\r\n" for h in header_lines)
    return (head + "\r\n").encode("latin-1") + body


@pytest.fixture
def quick_server():
    """A server whose read timeout is 0.3 s."""
    srv = server.start_in_thread(port=0, timeout=0.3)
    yield srv
    srv.shutdown()
    srv.server_close()


def test_a_plain_content_length_is_read(tool_server):
    status, record, _ = raw_exchange(tool_server.url, post("Content-Length: 159"))
    assert (status, record) == (200, ANSWER)


# ---- two lengths for one body: 400, whichever the server would have believed ------------------
@pytest.mark.parametrize("lines", [
    ("Content-Length: 159", "Transfer-Encoding: chunked"),
    ("Transfer-Encoding: chunked", "Content-Length: 159"),
    ("Content-Length: 159", "Transfer-Encoding: gzip, chunked"),
    ("Content-Length: 159", "Transfer-Encoding: identity"),
    ("Content-Length: 159", "transfer-encoding: CHUNKED"),
], ids=["chunked", "chunked-first", "gzip-chunked", "identity", "lower-case"])
def test_content_length_with_transfer_encoding_is_400_whatever_the_coding(tool_server, lines):
    status, record, _ = raw_exchange(tool_server.url, post(*lines))
    assert status == 400 and "both Content-Length and Transfer-Encoding" in record["error"], record
    assert record["response"] == ""
    assert_still_serves(tool_server.url)


@pytest.mark.parametrize("lines", [
    ("Content-Length: 159", "Content-Length: 160"),
    ("Content-Length: 160", "Content-Length: 159"),
    ("Content-Length: 159, 160",),
    ("Content-Length: 159,159,0",),
], ids=["two-fields", "two-fields-other-order", "comma-list", "comma-list-of-three"])
def test_content_length_values_that_differ_are_400(tool_server, lines):
    status, record, _ = raw_exchange(tool_server.url, post(*lines))
    assert status == 400 and "Content-Length values differ" in record["error"], record
    assert_still_serves(tool_server.url)


@pytest.mark.parametrize("lines", [
    ("Content-Length: 159", "Content-Length: 159"), ("Content-Length: 159, 159",), ("Content-Length: 0159",),
], ids=["two-fields", "comma-list", "leading-zero"])
def test_content_length_values_that_agree_are_one_length(tool_server, lines):
    # RFC 7230 Sec. 3.3.2 lets a recipient take a repeated identical value as that value.
    status, record, _ = raw_exchange(tool_server.url, post(*lines))
    assert (status, record) == (200, ANSWER)


@pytest.mark.parametrize("value", ["+159", "1_59", "15 9", " 1 59", "-159", "", "159.0", "0x9f", "\u00b2"],
                         ids=["plus", "underscore", "inner-space", "spaces", "negative", "empty", "decimal", "hex",
                              "superscript-two"])
def test_content_length_that_is_not_plain_ascii_digits_is_400(tool_server, value):
    # Python's int() takes "+159" and "1_59" as 159: the body below is 159 bytes, so reading it as
    # int() does would answer 200 where a proxy in front may have framed the request differently.
    status, record, _ = raw_exchange(tool_server.url, post(f"Content-Length: {value}"))
    assert status == 400 and "bad Content-Length" in record["error"], record
    assert_still_serves(tool_server.url)


@pytest.mark.parametrize("line", ["Transfer-Encoding : chunked", "Content-Length : 5", "no colon here"],
                         ids=["space-before-colon-te", "space-before-colon-cl", "no-colon"])
def test_a_header_line_that_is_not_name_colon_value_is_400(tool_server, line):
    # RFC 7230 Sec. 3.2.4; http.client would drop that line and every one after it.
    status, record, _ = raw_exchange(tool_server.url, post("Content-Length: 159", line))
    assert status == 400 and "malformed header line" in record["error"], record
    assert_still_serves(tool_server.url)


def test_a_chunked_body_is_not_read_and_411_asks_for_a_content_length(tool_server):
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    status, record, _ = raw_exchange(tool_server.url, post("Transfer-Encoding: chunked", body=chunked))
    assert status == 411 and "Content-Length required" in record["error"]
    assert_still_serves(tool_server.url)


def test_content_length_over_the_limit_is_413_however_many_digits_it_has(tool_server):
    for value in ["9" * 5000, "0" * 30 + str(server.MAX_BODY + 1)]:  # int() refuses 4,300+ digits
        status, record, _ = raw_exchange(tool_server.url, post(f"Content-Length: {value}", body=b""))
        assert status == 413 and str(server.MAX_BODY) in record["error"], (value[:40], record)
    assert_still_serves(tool_server.url)


def test_a_body_sent_with_get_is_never_read_as_the_next_request(tool_server):
    hidden = b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    data = b"GET /health HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(hidden), hidden)
    with connect(tool_server.url) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):  # the server closes after its one answer
            got += chunk
    assert got.count(b"HTTP/1.1 ") == 1 and got.startswith(b"HTTP/1.1 200 "), got
    assert_still_serves(tool_server.url)


# ---- request targets ----------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["http://{host}/virtual", "HTTP://{host}/virtual?x=1", "https://example.com/virtual"],
                         ids=["this-host", "upper-case-scheme-and-query", "other-host"])
def test_absolute_form_target_routes_by_its_path(tool_server, target):
    host = tool_server.url.removeprefix("http://")
    status, record, _ = raw_exchange(tool_server.url, post("Content-Length: 159", target=target.format(host=host)))
    assert (status, record) == (200, ANSWER)
    health = f"GET http://{host}/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
    assert raw_exchange(tool_server.url, health)[:2] == (200, {"status": "ok"})


@pytest.mark.parametrize("target", ["http:///virtual", "http:/virtual", "http://host/virtual/../health"])
def test_a_target_that_only_looks_absolute_is_404(tool_server, target):
    status, record, _ = raw_exchange(tool_server.url, post("Content-Length: 159", target=target))
    assert status == 404 and "no route" in record["error"]


# ---- Expect: 100-continue ------------------------------------------------------------------------
@pytest.mark.parametrize("lines, status", [
    ((f"Content-Length: {server.MAX_BODY + 1}",), 413),
    (("Content-Length: 159", "Transfer-Encoding: chunked"), 400),
], ids=["too-large", "two-lengths"])
def test_expect_100_continue_for_a_body_that_will_not_be_read_gets_its_error_at_once(tool_server, lines, status):
    with connect(tool_server.url) as s:  # the body is never sent: the answer must not wait for it
        s.sendall(post("Expect: 100-continue", *lines, body=b""))
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert got.startswith(b"HTTP/1.1 %d " % status) and b"100 Continue" not in got, got
    assert_still_serves(tool_server.url)


def test_expect_100_continue_for_a_body_that_will_be_read_gets_100_then_the_answer(tool_server):
    with connect(tool_server.url) as s:
        s.sendall(post("Expect: 100-continue", "Content-Length: 159", body=b""))
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(BODY)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == ANSWER


# ---- a request that stops before its headers end --------------------------------------------------
@pytest.mark.parametrize("data", [b"POST /virtual HTTP/1.1\r\n", b"POST /virtual HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"],
                         ids=["request-line-only", "headers-without-blank-line"])
def test_headers_that_stop_before_their_blank_line_are_closed_after_the_timeout_without_an_answer(quick_server, data):
    # The read timeout of every other read (no separate deadline for the whole header block).
    with connect(quick_server.url) as s:
        t0 = time.monotonic()
        s.sendall(data)
        try:
            got = s.recv(65536)
        except ConnectionResetError:
            got = b""
        assert got == b"" and 0.2 < time.monotonic() - t0 < 3
    assert_still_serves(quick_server.url)
