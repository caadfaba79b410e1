#!/usr/bin/env python3
"""Writes the hand-made seed corpus of the three fuzz targets into fuzz/corpus/<target>/.

Each seed is one kind of input the parsers must handle (valid, and each documented kind of bad input),
so the fuzzer starts from every interesting state instead of finding them by chance. Run from anywhere:
`python3 fuzz/seeds.py`. The files are committed; rerun only to change the seeds.
"""
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- http_request: raw request heads (and bodies) ----
def post(path, body, extra=b""):
    return (b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + extra
            + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


WS = (b"GET /ws?user_id=u1&channels=a,b&since=0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b HTTP/1.1\r\n"
      b"Host: t\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
      b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
HTTP = {
    "get_health": b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n",
    "get_history": b"GET /api/v1/notifications/user/u%201?limit=5&before=0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b&unread=true HTTP/1.1\r\nHost: t\r\n\r\n",
    "post_send": post(b"/api/v1/notifications/send", b'{"user_id":"u1","message":"hi","data":{"k":1}}'),
    "post_batch": post(b"/api/v1/notifications/batch", b'{"notifications":[{"user_id":"u","message":"m"}]}'),
    "post_alias_charset": post(b"/notifications", b"{}", b"Content-Type: application/json; charset=utf-8\r\n"),
    "put_read": b"PUT /api/v1/notifications/u1/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b/read HTTP/1.1\r\nHost: t\r\n\r\n",
    "delete": b"DELETE /api/v1/notifications/scheduled/x HTTP/1.1\r\nConnection: close\r\n\r\n",
    "options_star": b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n",
    "http10_keepalive": b"GET /health HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    "absolute_form": b"GET http://example.com:8080/api/v1/notifications/user/u?limit=1 HTTP/1.1\r\n\r\n",
    "ws_upgrade": WS,
    "ws_bad_version": WS.replace(b"Version: 13", b"Version: 8"),
    "ws_bad_key": WS.replace(KEY, b"short"),
    "pipelined": b"GET /health HTTP/1.1\r\n\r\n" + post(b"/api/v1/notifications/send", b"{}") + b"GET /x HTTP/1.1\r\n\r\n",
    "leading_crlf": b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    "lf_only": b"GET / HTTP/1.1\nHost: t\n\n",
    "chunked": b"POST /api/v1/notifications/send HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\nabc",
    "post_no_length": b"POST /api/v1/notifications/send HTTP/1.1\r\nHost: t\r\n\r\n",
    "cl_conflict": b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    "cl_list_same": b"POST / HTTP/1.1\r\nContent-Length: 2 , 2\r\ncontent-length: 02\r\n\r\n{}",
    "cl_bad": b"POST / HTTP/1.1\r\nContent-Length: +0x1\r\n\r\n",
    "cl_huge": b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "http2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "bad_header_name": b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nX-A: a\r\n  folded\r\n\r\n",
    "obs_text": b"GET /caf\xc3\xa9 HTTP/1.1\r\nX-Bin: \xff\xfe\x80\r\nContent-Type: application/vnd.x+json\r\n\r\n",
    "bad_method": b"G(T / HTTP/1.1\r\n\r\n",
    "too_many_headers": b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(65)) + b"\r\n",
    "partial": b"GET /health HTTP/1.1\r\nHost:",
}
for name, data in HTTP.items():
    write("http_request", name, data)


# ---- ws_frame: one config byte (limit index | reads << 3), then client frames ----
MASK = b"\x37\xfa\x21\x3d"


def frame(first, payload, masked=True, length=None):
    n = len(payload) if length is None else length
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([first, bit | n])
    elif n <= 0xFFFF:
        head = bytes([first, bit | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, bit | 127]) + struct.pack(">Q", n)
    if not masked:
        return head + payload
    return head + MASK + bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))


def cfg(limit_index, reads=0):
    return bytes([limit_index | (reads << 3)])


DEFAULT, SMALL = 6, 5  # 65,536 and 1,024 in ws_frame's LIMITS
WSF = {
    "text": cfg(DEFAULT) + frame(0x81, b'{"action":"ping"}'),
    "text_utf8_1byte_reads": cfg(DEFAULT, 1) + frame(0x81, "h\u00e9llo \u20ac \U0001F600".encode()),
    "fragmented_with_ping": cfg(DEFAULT, 3) + frame(0x01, b'{"action"') + frame(0x89, b"hi")
    + frame(0x00, b':"pi') + frame(0x80, b'ng"}'),
    "utf8_split_across_fragments": cfg(DEFAULT) + frame(0x01, "\u20ac".encode()[:1]) + frame(0x80, "\u20ac".encode()[1:]),
    "utf8_cut_at_end": cfg(DEFAULT) + frame(0x01, b"a") + frame(0x80, "\u20ac".encode()[:2]),
    "bad_utf8": cfg(DEFAULT) + frame(0x81, b"\xff\xfe"),
    "pong": cfg(DEFAULT) + frame(0x8A, b"pong"),
    "close_code_reason": cfg(DEFAULT) + frame(0x88, struct.pack(">H", 1001) + "bye \u00e9".encode()) + frame(0x81, b"after"),
    "close_empty": cfg(DEFAULT) + frame(0x88, b""),
    "close_1_byte": cfg(DEFAULT) + frame(0x88, b"\x03"),
    "close_bad_code": cfg(DEFAULT) + frame(0x88, struct.pack(">H", 1005)),
    "close_bad_reason": cfg(DEFAULT) + frame(0x88, struct.pack(">H", 1000) + b"\xff"),
    "binary": cfg(DEFAULT) + frame(0x82, b"\x00\x01"),
    "rsv1": cfg(DEFAULT) + frame(0xC1, b"{}"),
    "rsv3": cfg(DEFAULT) + frame(0x91, b"{}"),
    "reserved_data_opcode": cfg(DEFAULT) + frame(0x83, b"x"),
    "reserved_control_opcode": cfg(DEFAULT) + frame(0x8B, b"x"),
    "unmasked": cfg(DEFAULT) + frame(0x81, b"{}", masked=False),
    "continuation_alone": cfg(DEFAULT) + frame(0x80, b"x"),
    "text_inside_fragmented": cfg(DEFAULT) + frame(0x01, b"a") + frame(0x81, b"b"),
    "ping_over_125": cfg(DEFAULT) + frame(0x89, b"p" * 126),
    "fragmented_ping": cfg(DEFAULT) + frame(0x09, b"p"),
    "len16_text": cfg(SMALL, 7) + frame(0x81, b"a" * 300),
    "over_limit_16": cfg(SMALL) + frame(0x81, b"a" * 1025),
    "len64_header_only": cfg(DEFAULT) + frame(0x81, b"", length=1 << 63)[:14],
    "fragmented_over_limit": cfg(2) + frame(0x01, b"0123456789") + frame(0x80, b"abcdefg"),
    "several_messages": cfg(DEFAULT, 5) + frame(0x81, b"a") + frame(0x81, b"") + frame(0x89, b"") + frame(0x81, b"{}"),
    "partial_frame": cfg(DEFAULT) + frame(0x81, b"abcdef")[:8],
}
for name, data in WSF.items():
    write("ws_frame", name, data)


# ---- ws_protocol: one text message each ----
ID = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
PROTO = {
    "subscribe": '{"action":"subscribe","channels":["sala1","news.sport"]}',
    "unsubscribe": '{"action":"unsubscribe","channels":["sala1"]}',
    "publish": '{"action":"publish","channel":"sala1","data":{"x":[1,2.5,-3e2,true,null,"\\u00e9\\ud83d\\ude00"]}}',
    "publish_no_data": '{"action":"publish","channel":"c"}',
    "publish_null_data": '{"action":"publish","channel":"c","data":null}',
    "ping": '{"action":"ping"}',
    "read": '{"action":"read","id":"%s"}' % ID,
    "resume": '{"action":"resume","since":"%s"}' % ID,
    "not_json": "not json at all",
    "array": "[1,2]",
    "unknown_action": '{"action":"dance"}',
    "no_action": '{"channels":["a"]}',
    "action_not_string": '{"action":5}',
    "bad_channel": '{"action":"subscribe","channels":["ok","bad name"]}',
    "empty_channels": '{"action":"subscribe","channels":[]}',
    "channels_not_list": '{"action":"subscribe","channels":"a"}',
    "bad_id": '{"action":"read","id":"nope"}',
    "resume_missing": '{"action":"resume"}',
    "duplicate_keys": '{"action":"ping","action":"subscribe","channels":["a"]}',
    "deep_nesting": '{"action":"publish","channel":"c","data":' + "[" * 200 + "]" * 200 + "}",
    "big_numbers": '{"action":"publish","channel":"c","data":{"n":123456789012345678901234567890,"f":1e400}}',
    "escapes": '{"action":"sub\\u0073cribe","channels":["\\u0061"]}',
    "lone_surrogate": '{"action":"publish","channel":"c","data":{"s":"\\ud800"}}',
    "trailing": '{"action":"ping"} {"action":"ping"}',
    "whitespace": ' \t\r\n{ "action" : "ping" } \n',
}
for name, text in PROTO.items():
    write("ws_protocol", name, text.encode())
write("ws_protocol", "invalid_utf8", b'{"action":"\xff"}')
