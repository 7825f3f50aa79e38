"""The HTTP/1.1 codecs: h11 (the reference) and httptools must behave alike.

Each test runs on both codecs and asserts what the server and the pool rely
on; the server's and the pool's own tests also run on both, over sockets.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.transports import _codec_h11, _codec_httptools
from keyrotor.transports.codec import (
    CLOSED,
    END,
    NEED_DATA,
    BadMessage,
    BadOutgoing,
    RequestHead,
    ResponseHead,
    check_fields,
    resolve,
)

SERVERS = {"h11": _codec_h11.ServerCodec, "httptools": _codec_httptools.ServerCodec}
CLIENTS = {"h11": _codec_h11.ClientCodec, "httptools": _codec_httptools.ClientCodec}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Any:
    return SERVERS[request.param](1000)


@pytest.fixture(params=sorted(CLIENTS))
def client(request: pytest.FixtureRequest) -> Any:
    return CLIENTS[request.param]()


def events(codec: Any, data: bytes = b"") -> list[Any]:
    """Feed ``data`` (if any), then pull events up to the first NEED_DATA or CLOSED."""
    if data:
        codec.receive_data(data)
    out: list[Any] = []
    while True:
        event = codec.next_event()
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)
        if event is END:
            return out


def summary(items: list[Any]) -> list[Any]:
    """Heads as tuples, body pieces joined: comparable across codecs."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, RequestHead):
            out.append((item.method, item.target, list(item.headers), item.http_version))
        elif isinstance(item, ResponseHead):
            out.append((item.status, item.headers))
        elif isinstance(item, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += item
            else:
                out.append(item)
        else:
            out.append(item)
    return out


def answer(codec: Any, body: bytes = b"ok", **extra: bytes) -> bytes:
    headers = [(b"content-length", b"%d" % len(body))]
    headers += [(name.encode(), value) for name, value in extra.items()]
    data = codec.head(200, b"OK", headers)
    data += codec.data(body) if body else b""
    return data + codec.end()


# --------------------------------------------------------------------------- server side


def test_pipelined_requests_come_out_in_order_with_their_bodies(server: Any) -> None:
    server.receive_data(
        b"POST /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
    )
    first = summary(events(server))
    assert first == [
        (b"POST", b"/a", [(b"host", b"t"), (b"content-length", b"3")], b"1.1"),
        b"abc",
        END,
    ]
    answer(server)
    assert server.reusable and server.buffered
    server.start_next_cycle()
    second = summary(events(server))
    assert second[0][:2] == (b"POST", b"/b") and second[1:] == [b"xy", END]
    answer(server)
    assert server.reusable and not server.buffered
    server.start_next_cycle()
    assert server.next_event() is NEED_DATA


def test_a_head_split_across_reads_is_put_together(server: Any) -> None:
    got: list[Any] = []
    for piece in (
        b"GET /pa",
        b"th?q=1 HTTP/1.1\r\nHo",
        b"st: t\r\nX-Lo",
        b"ng: va",
        b"lue\r\n\r\n",
    ):
        got += events(server, piece)
    assert summary(got) == [
        (b"GET", b"/path?q=1", [(b"host", b"t"), (b"x-long", b"value")], b"1.1"),
        END,
    ]


def test_keep_alive_close_and_http_1_0(server: Any) -> None:
    events(server, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"connection: close" in answer(server).lower()
    assert not server.reusable

    old = type(server)(1000)
    events(old, b"GET / HTTP/1.0\r\n\r\n")
    head = old.head(200, b"OK", [])  # no length: the body ends with the connection
    assert b"connection: close" in head.lower() and b"chunked" not in head.lower()
    assert old.data(b"abc") == b"abc" and old.end() == b""
    assert not old.reusable


def test_a_stream_is_chunked_to_a_1_1_client(server: Any) -> None:
    events(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    head = server.head(200, b"OK", [(b"content-type", b"text/event-stream")])
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"connection" not in head.lower()
    assert server.data(b"data: 1\n\n") == b"9\r\ndata: 1\n\n\r\n"
    assert server.end() == b"0\r\n\r\n"
    assert server.reusable


def test_a_head_request_gets_no_body(server: Any) -> None:
    events(server, b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = server.head(200, b"OK", [(b"content-length", b"5")])
    assert server.end() == b""  # the server sends no body to HEAD: nothing missing
    assert data.endswith(b"\r\n\r\n") and server.reusable


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"\x16\x03\x01garbage\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: t\r\nBad Header: x\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: nope\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["no-host", "two-hosts", "garbage", "header", "content-length", "chunk-size"],
)
def test_malformed_requests_are_bad_messages_400(server: Any, data: bytes) -> None:
    with pytest.raises(BadMessage) as caught:
        events(server, data)
    assert caught.value.status == 400
    assert b"garbage" not in caught.value.reason.encode() and "x" not in caught.value.reason[-2:]


def test_a_head_that_grows_past_the_limit_is_431(server: Any) -> None:
    server.receive_data(b"GET / HTTP/1.1\r\nHost: t\r\n")
    with pytest.raises(BadMessage) as caught:
        for _ in range(40):
            assert events(server, b"X-Filler: " + b"y" * 90 + b"\r\n") == []
    assert caught.value.status == 431


def test_eof_between_requests_is_closed_and_inside_one_is_an_error(server: Any) -> None:
    events(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    answer(server)
    server.start_next_cycle()
    server.receive_data(b"")
    assert server.next_event() is CLOSED

    cut = type(server)(1000)
    cut.receive_data(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
    assert summary(events(cut))[1:] == [b"abc"]
    cut.receive_data(b"")
    with pytest.raises(BadMessage):
        cut.next_event()


def test_expect_100_continue(server: Any) -> None:
    server.receive_data(
        b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    assert isinstance(server.next_event(), RequestHead)
    assert server.expects_continue
    assert server.informational_continue().startswith(b"HTTP/1.1 100 ")
    assert not server.expects_continue
    assert summary(events(server, b"hi")) == [b"hi", END]


def test_what_we_send_is_checked_before_anything_is_committed(server: Any) -> None:
    events(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    for status, headers in [
        (200, [(b"x-bad", b"a\r\nb")]),
        (200, [(b"bad name", b"v")]),
        (200, [(b"x-space", b" padded")]),
        (99, []),
        (200, [(b"x-list", [b"v"])]),  # unhashable
        (200, [(b"x", b"v", b"extra")]),
    ]:
        with pytest.raises(BadOutgoing):
            server.head(status, b"X", headers)
        assert server.can_respond
    server.head(200, b"OK", [(b"content-length", b"2")])
    assert not server.can_respond
    with pytest.raises(BadOutgoing):
        server.data(b"too long")


def test_an_upgrade_request_is_answered_then_the_connection_ends(server: Any) -> None:
    server.receive_data(
        b"GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    )
    assert isinstance(server.next_event(), RequestHead)
    answer(server)
    assert not server.reusable


UPGRADE_POST = (
    b"POST / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
)


@pytest.mark.parametrize("cut", [None, 3, 0])
def test_an_upgrade_request_with_a_body_is_served_with_its_body(server: Any, cut: int) -> None:
    """curl --http2 on http:// asks to upgrade (h2c): nothing is upgraded here,
    and the request is served whole (httptools' parser skipped the body)."""
    head = UPGRADE_POST + b"Content-Length: 5\r\n\r\n"
    data = head + b"hello" + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"  # nothing after it is served
    if cut is None:
        got = events(server, data)
    else:
        got = events(server, head + b"hello"[:cut])
        got += events(server, b"hello"[cut:])
    assert summary(got)[1:] == [b"hello", END]


def test_an_upgrade_request_with_a_chunked_body_is_refused(server: Any) -> None:
    data = UPGRADE_POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    with pytest.raises(BadMessage) as caught:
        events(server, data)
    assert caught.value.status == 400 and "Upgrade" in caught.value.reason


def test_expect_100_continue_is_read_in_any_case(server: Any) -> None:
    server.receive_data(
        b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-Continue \r\nContent-Length: 2\r\n\r\n"
    )
    assert isinstance(server.next_event(), RequestHead)
    assert server.expects_continue


def test_a_header_value_with_a_control_character_is_a_bad_message(server: Any) -> None:
    with pytest.raises(BadMessage) as caught:
        events(server, b"GET / HTTP/1.1\r\nHost: t\r\nUser-Agent: a\x7fb\r\n\r\n")
    assert caught.value.status == 400


def test_a_stream_to_a_1_1_client_that_closes_is_chunked_so_a_cut_is_seen(server: Any) -> None:
    events(server, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head = server.head(200, b"OK", [(b"content-type", b"text/event-stream")]).lower()
    assert b"transfer-encoding: chunked" in head and b"connection: close" in head
    assert server.data(b"x") == b"1\r\nx\r\n" and server.end() == b"0\r\n\r\n"


def test_trailer_fields_are_not_the_heads(server: Any) -> None:
    data = (
        b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nAuthorization: Bearer sneaked\r\nX-Keyrotor-Key: k9\r\n\r\n"
    )
    got = summary(events(server, data))
    assert got[0][2] == [(b"host", b"t"), (b"transfer-encoding", b"chunked")]
    assert got[1:] == [b"hi", END]


# --------------------------------------------------------------------------- client side


def request(client: Any, method: bytes = b"GET", body: bytes | None = None) -> bytes:
    headers = [(b"host", b"up")]
    if body is not None:
        headers.append((b"content-length", b"%d" % len(body)))
    return client.request(client.prepare(method, b"/v1/x", headers), body)


def test_a_request_is_written_whole(client: Any) -> None:
    data = request(client, b"POST", b'{"a":1}')
    assert data.startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert data.lower().endswith(b"host: up\r\ncontent-length: 7\r\n\r\n" + b'{"a":1}')


def test_a_response_its_body_and_reuse(client: Any) -> None:
    request(client)
    got = summary(events(client, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhel"))
    assert got == [(200, [(b"content-length", b"5"), (b"x-a", b"b")]), b"hel"]
    assert summary(events(client, b"lo")) == [b"lo", END]
    assert client.reusable
    client.start_next_cycle()
    request(client)
    assert summary(events(client, b"HTTP/1.1 204 No Content\r\n\r\n")) == [(204, []), END]


def test_interim_responses_are_skipped(client: Any) -> None:
    request(client, b"POST", b"x")
    got = summary(
        events(
            client, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
    )
    assert got == [(200, [(b"content-length", b"2")]), b"ok", END]


def test_chunked_and_read_to_eof_bodies(client: Any) -> None:
    request(client)
    got = events(
        client, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
    )
    assert summary(got)[1:] == [b"hi", END] and client.reusable

    to_eof = type(client)()
    request(to_eof)
    assert summary(events(to_eof, b"HTTP/1.1 200 OK\r\n\r\nall of it"))[1:] == [b"all of it"]
    to_eof.receive_data(b"")
    assert to_eof.next_event() is END
    assert not to_eof.reusable


def test_a_head_response_has_no_body(client: Any) -> None:
    request(client, b"HEAD")
    got = summary(events(client, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"))
    assert got == [(200, [(b"content-length", b"100")]), END]


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
    ],
    ids=["close", "http-1.0", "unasked-bytes"],
)
def test_connections_that_cannot_serve_again_are_not_reused(client: Any, reply: bytes) -> None:
    request(client)
    assert summary(events(client, reply))[1:] == [b"ok", END]
    assert not client.reusable


def test_broken_responses_are_bad_messages(client: Any) -> None:
    request(client)
    with pytest.raises(BadMessage):
        events(client, b"garbage\r\n\r\n")
    cut = type(client)()
    request(cut)
    events(cut, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    cut.receive_data(b"")
    with pytest.raises(BadMessage, match="complete"):
        cut.next_event()


@pytest.mark.parametrize(
    "method, target, headers",
    [
        (b"GET", b"/a b", []),
        (b"G T", b"/", []),
        (b"GET", b"/", [(b"x", b"a\nb")]),
        (b"GET", b"/", [(b"x y", b"v")]),
    ],
)
def test_a_bad_request_is_refused_before_anything_is_written(
    client: Any, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(BadOutgoing):
        client.prepare(method, target, [(b"host", b"up"), *headers])


def test_parser_names() -> None:
    assert resolve("h11") == "h11"
    assert resolve("auto") == "httptools"  # installed with the test extras
    assert resolve("httptools") == "httptools"
    with pytest.raises(ValueError, match="choose"):
        resolve("fast")


# --------------------------------------------------------------------------- both, at random

tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda s: s not in ("host", "content-length", "transfer-encoding", "connection", "expect")
)
values = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 ,;=/", max_size=20).map(
    lambda s: s.strip() or "v"
)
bodies = st.binary(max_size=300)
PADS = st.sampled_from(["", " ", "\t", " \t "])  # after a value: not the value's (RFC 9110 5.5)


def pad(name: str, draw: st.DrawFn) -> str:
    """Whitespace after a field's value (not after Host or framing: h11 refuses some)."""
    return draw(PADS) if name[0].islower() else ""


TRAILERS = st.sampled_from([b"", b"X-Checksum: abc\r\n", b"Authorization: Bearer t\r\n"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    path = "/" + draw(st.text(alphabet="abcdefghij/_-.", max_size=20))
    headers = [("Host", "t"), *draw(st.lists(st.tuples(tokens, values), max_size=5))]
    body = draw(bodies) if method != "GET" else b""
    chunked = bool(body) and draw(st.booleans())
    if chunked:
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
        framed += b"0\r\n" + draw(TRAILERS) + b"\r\n"
    else:
        if body or method != "GET":
            headers.append(("Content-Length", str(len(body))))
        framed = body
    lines = "".join(f"{n}: {v}{pad(n, draw)}\r\n" for n, v in headers)
    return f"{method} {path} HTTP/1.1\r\n{lines}".encode() + b"\r\n" + framed


def split(data: bytes, draw: st.DrawFn) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if data[a:b]]


def serve_all(codec: Any, pieces: list[bytes], count: int) -> list[Any]:
    """Feed ``pieces`` one by one, answering each request when it is complete."""
    out: list[Any] = []
    answered = 0
    for piece in pieces:
        codec.receive_data(piece)
        while answered < count:
            got = events(codec)
            out += got
            if not got or got[-1] is not END:
                break
            answer(codec)
            answered += 1
            if codec.reusable:
                codec.start_next_cycle()
    return summary(out)


@settings(max_examples=150, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=4), st.data())
def test_pipelined_requests_cut_anywhere_parse_the_same_on_both(
    batch: list[bytes], data: st.DataObject
) -> None:
    pieces = split(b"".join(batch), data.draw)
    h11_events = serve_all(SERVERS["h11"](65536), pieces, len(batch))
    fast_events = serve_all(SERVERS["httptools"](65536), pieces, len(batch))
    assert fast_events == h11_events
    assert h11_events.count(END) == len(batch)


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    status = draw(st.sampled_from([200, 201, 400, 401, 402, 429, 500, 503]))
    headers = draw(st.lists(st.tuples(tokens, values), max_size=5))
    body = draw(bodies)
    if draw(st.booleans()):
        headers.append(("Transfer-Encoding", "chunked"))
        framed = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
        framed += b"0\r\n" + draw(TRAILERS) + b"\r\n"
    else:
        headers.append(("Content-Length", str(len(body))))
        framed = body
    lines = "".join(f"{n}: {v}{pad(n, draw)}\r\n" for n, v in headers)
    return f"HTTP/1.1 {status} X\r\n{lines}".encode() + b"\r\n" + framed, body


@settings(max_examples=150, deadline=None)
@given(st.lists(responses(), min_size=1, max_size=3), st.data())
def test_responses_cut_anywhere_parse_the_same_on_both(
    batch: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    splits = [split(raw, data.draw) for raw, _ in batch]
    results = {}
    for name, cls in CLIENTS.items():
        codec = cls()
        got: list[Any] = []
        for pieces in splits:  # one response per request, on a kept-alive connection
            request(codec, b"POST", b"{}")
            this: list[Any] = []
            for piece in pieces:
                codec.receive_data(piece)
                this += events(codec)
                if this and this[-1] is END:
                    break
            got += this
            assert codec.reusable
            codec.start_next_cycle()
        results[name] = summary(got)
    assert results["httptools"] == results["h11"]
    bodies_seen = [item for item in results["h11"] if isinstance(item, bytes)]
    assert bodies_seen == [body for _, body in batch if body]


@pytest.mark.parametrize("name", sorted(SERVERS))
def test_a_refusal_never_quotes_a_header_value(name: str) -> None:
    secret = b"sk-or-v1-do-not-log-me"
    bad = [(b"authorization", b"Bearer " + secret + b"\r\nx: y")]
    with pytest.raises(BadOutgoing) as caught:
        CLIENTS[name].prepare(b"POST", b"/v1/x", [(b"host", b"up"), *bad])
    assert b"do-not-log" not in str(caught.value).encode()
    server = SERVERS[name](1000)
    events(server, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    with pytest.raises(BadOutgoing) as caught:
        server.head(200, b"OK", bad)
    assert b"do-not-log" not in str(caught.value).encode()


# RFC 9110 5.5 as a regular expression: the rule ``check_fields`` keeps for values.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]|\A[ \t]|[ \t]\Z")


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.sampled_from([b" ", b"\t", b"\x00", b"\x08", b"\n", b"\r", b"\x1f", b"\x7f", b"\x80"])
        | st.binary(min_size=1, max_size=3),
        max_size=8,
    ).map(b"".join)
)
def test_a_header_value_is_refused_exactly_when_the_rule_says(value: bytes) -> None:
    # Control bytes but the tab, and whitespace at either end, anywhere in the value.
    refused = False
    try:
        check_fields([(b"x-test", value)])
    except BadOutgoing:
        refused = True
    assert refused == bool(_BAD_VALUE.search(value))
