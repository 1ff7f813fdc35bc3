"""Property-based tests of the data plane's edges (design §5): arbitrary request bytes and
arbitrary upstream response bytes never produce a traceback, a hang, or an answer that belongs
to another request; every connection is answered or closed.

Two real proxies (subprocesses, as users run them) serve the whole module, one per side.

Request side (`test_arbitrary_request_bytes`): the proxy's default target is `EchoBackend`, a
strict (h11) server that answers every request with its own name (`ok <request-target>`, a
sequence number and the target in headers) and records what it received. Hypothesis sends
random bytes, requests built from parts (framing, odd headers, bad request lines, WebSocket and
CONNECT upgrades) with random byte edits, pipelines of them, and floods of more requests than
the proxy parses ahead; every request carries a unique token in its path, and the bytes go in
pieces, then a half-close or a sentinel request. `httptools` (the proxy's own parser) replays
the bytes to tell which requests the proxy saw, in order. Checked: the answers are well-formed
HTTP/1.1 (a strict reader, `parse_answers`); each answer from the target names the request at
its position, in order; the target received only requests the proxy parsed, with the bodies it
parsed (anything else is smuggling); valid pipelines are answered whole; nothing hangs (after
a half-close, an error or an upgrade the proxy closes; after complete requests it answers).

Response side (`test_arbitrary_response_bytes`): `/hostile` leads to `HostileUpstream`, which
answers with hypothesis-chosen bytes (random, or responses built from parts: 1xx, 101, 204,
304, lengths and chunking right and wrong, odd headers, a second response, garbage; edited),
in pieces; `/healthy` leads to an `EchoBackend`. h11 reads the same bytes as a reference client:
where it reads a whole response, the proxy relays that response or answers 503. The next
request on the same client connection (same route, then the healthy one) and requests on new
connections get exactly their own answers, and a target connection that sent more than its
response is closed, never reused.

Every read has a deadline (DEADLINE: past it, a hang), every example ends with a probe on a new
connection and a look at the proxy's new log lines (no "Traceback", no "Uncaught"), and sizes
are small: the file runs in seconds. Examples are derandomized and there is no example
database, so CI runs the same cases every time; failing examples are not shrunk unless
FUZZ_SHRINK=1 (a hang costs DEADLINE per try). The regression tests run cases found before
through the same checks, every time.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import h11
import httptools
import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from rawhttp import RawServer
from support import TOKEN, Proxy

DEADLINE = 10.0  # seconds any one read may wait for the proxy: past it, the example has hung
MAX_HEADER_SIZE = 4096  # --max-header-size of both proxies: small, so limits are reachable

FUZZ_SETTINGS = settings(
    max_examples=150,
    # no shrinking unless asked for (FUZZ_SHRINK=1): a failing example that hangs costs
    # DEADLINE each time, and the examples are small already
    phases=[Phase.explicit, Phase.reuse, Phase.generate]
    + ([Phase.shrink] if os.environ.get("FUZZ_SHRINK") else []),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- tokens: every request of every example has a name no other request has ---------------------

_token_numbers = itertools.count(1)
TOKEN_RE = re.compile(rb"t[0-9a-f]{12}z")


def new_tokens(n: int) -> list[bytes]:
    """`n` fresh tokens (14 bytes each); two tokens differ in most of their bytes, so no edit of
    a byte or two turns one into another."""
    return [
        b"t" + hashlib.sha1(b"%d" % next(_token_numbers)).hexdigest()[:12].encode() + b"z"
        for _ in range(n)
    ]


def tokens_in(data: bytes) -> list[bytes]:
    return TOKEN_RE.findall(data)


# -- the proxy, with its stderr read as it comes -------------------------------------------------


class FuzzProxy(Proxy):
    """A proxy whose stderr is collected by a thread as well (a pipe nobody reads could stall
    the process, and whatever lands there counts as log output)."""

    def __init__(self, args: list[str], env: dict[str, str], token: str) -> None:
        super().__init__(args, env, token)
        self.err_lines: list[str] = []
        self._err_reader = threading.Thread(target=self._read_stderr_lines, daemon=True)
        self._err_reader.start()

    def _read_stderr_lines(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err_lines.append(line.rstrip("\n"))

    def mark(self) -> tuple[int, int]:
        return len(self.lines), len(self.err_lines)

    def log_since(self, mark: tuple[int, int]) -> str:
        return "\n".join(self.lines[mark[0] :] + self.err_lines[mark[1] :])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err_reader.join(10)  # before the parent class reads what is left of stderr
        return super().stop(sig, timeout)


def say(message: str) -> None:
    """Hypothesis' `note` in a property (shown with a failing example); a print (shown with a
    failing test) in the regression tests that run the same checks."""
    try:
        note(message)
    except InvalidArgument:
        print(message)


def start_proxy(*args: str) -> FuzzProxy:
    env = {k: v for k, v in os.environ.items() if k != "CONFIGPROXY_AUTH_TOKEN"}
    env["CONFIGPROXY_AUTH_TOKEN"] = TOKEN
    argv = ["--ip", "127.0.0.1", "--port", "0", "--api-ip", "127.0.0.1", "--api-port", "0"]
    return FuzzProxy([*argv, *args], env, TOKEN)


def assert_clean_log(proxy: FuzzProxy, mark: tuple[int, int]) -> None:
    assert proxy.proc.poll() is None, "the proxy died:\n" + proxy.log_since((0, 0))
    text = proxy.log_since(mark)
    assert "Traceback" not in text, text
    assert "Uncaught" not in text, text


# -- targets --------------------------------------------------------------------------------------


@dataclass
class Seen:
    """A request as the target received it."""

    seq: int
    method: bytes
    target: bytes
    body: bytes
    conn: int


class EchoBackend:
    """A strict HTTP/1.1 target (h11) answering each request with its own name.

    The answer's body is `ok <request-target>`, and its headers carry `X-Seq` (a number no other
    answer has) and `X-Target` (the target in hex, for answers to HEAD). `seen` maps each
    number to what arrived; `rejected` lists what h11 refused (the connection is then closed
    after a 400)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[int, Seen] = {}
        self.rejected: list[str] = []
        self._seq = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self.server = RawServer(self._serve)
        self.url = self.server.url

    def records(self) -> list[Seen]:
        with self.lock:
            return sorted(self.seen.values(), key=lambda s: s.seq)

    def _serve(self, conn: socket.socket) -> None:
        # no timeout: an idle connection waits in the proxy's pool as long as the proxy likes
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cid = next(self._conn_ids)
        h = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body: list[bytes] = []
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as e:
                with self.lock:
                    self.rejected.append(f"{e} (after {request!r})")
                conn.sendall(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                return
            if event is h11.NEED_DATA:
                h.receive_data(conn.recv(65536))
                continue
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                request, body = event, []
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                seq = next(self._seq)
                target = bytes(request.target)
                with self.lock:
                    self.seen[seq] = Seen(seq, bytes(request.method), target, b"".join(body), cid)
                payload = b"ok " + target
                headers = [
                    ("Content-Length", str(len(payload))),
                    ("X-Seq", str(seq)),
                    ("X-Target", target.hex()),
                ]
                status = 405 if request.method == b"CONNECT" else 200
                out = h.send(h11.Response(status_code=status, headers=headers)) or b""
                if request.method != b"HEAD":
                    out += h.send(h11.Data(data=payload)) or b""
                out += h.send(h11.EndOfMessage()) or b""
                conn.sendall(out)
                if h.our_state is h11.MUST_CLOSE:
                    return
                h.start_next_cycle()

    def stop(self) -> None:
        self.server.stop()


def good_answer(path: bytes) -> bytes:
    body = b"ok " + path
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class HostileUpstream:
    """A target that answers the next request with whatever bytes a test queued (`act`), and
    every other request with `good_answer(path)`.

    After bytes that hold more than one response (`extra`), the connection must carry no other
    request: the proxy may not reuse a connection whose target said more than its answer, and
    must close it. A request that arrives anyway is recorded in `reused_after_extra`; the
    connections not closed yet are in `tainted`."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.actions: deque[tuple[list[bytes], bool, bool]] = deque()
        self.reused_after_extra: list[bytes] = []
        self.tainted: dict[socket.socket, bytes] = {}
        self.server = RawServer(self._serve)
        self.url = self.server.url

    def act(self, pieces: list[bytes], keep_open: bool, extra: bool) -> None:
        """Answer the next request with `pieces` (a moment apart: most often, a read each)."""
        with self.lock:
            self.actions.clear()
            self.actions.append((pieces, keep_open, extra))

    def reset(self) -> None:
        """Forget what earlier cases left: close the connections the proxy should have closed
        (a failed case may have left one pooled), and what was recorded."""
        with self.lock:
            self.actions.clear()
            self.reused_after_extra.clear()
            for conn in self.tainted:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self.lock.wait_for(lambda: not self.tainted, DEADLINE)

    def still_tainted(self) -> list[bytes]:
        """The connections that sent more than their answer and are still open, once the proxy
        has had DEADLINE / 4 seconds to close them."""
        with self.lock:
            self.lock.wait_for(lambda: not self.tainted, DEADLINE / 4)
            return list(self.tainted.values())

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        finally:
            with self.lock:
                self.tainted.pop(conn, None)
                self.lock.notify_all()

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(None)  # as EchoBackend's
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        tainted = False
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data or len(buf) > 1 << 20:
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            length = re.search(rb"(?i)\r\ncontent-length: *([0-9]+)", head)
            if length:  # the body (the proxy sends what the client sent: a few bytes)
                while len(buf) < int(length.group(1)):
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[int(length.group(1)) :]
            if tainted:
                with self.lock:
                    self.reused_after_extra.append(line)
            with self.lock:
                action = self.actions.popleft() if self.actions else None
            if action is None:
                conn.sendall(good_answer(line.split(b" ")[1]))
                continue
            pieces, keep_open, extra = action
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(0.002)
                conn.sendall(piece)
            if not keep_open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
                return
            tainted = extra
            if extra:
                with self.lock:
                    self.tainted[conn] = line

    def stop(self) -> None:
        self.server.stop()


# -- the client side: a raw connection, and a strict reader of what the proxy sends --------------


class Wire:
    """A client connection to the proxy that keeps everything it reads."""

    def __init__(self, proxy: Proxy) -> None:
        self.sock = socket.create_connection((proxy.host, proxy.port), timeout=DEADLINE)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.data = b""
        self.eof = False  # the proxy closed (FIN or reset)
        self.broken = False  # sending failed: the proxy had closed already

    def send(self, data: bytes) -> None:
        if self.broken or not data:
            return
        try:
            self.sock.sendall(data)
        except OSError:  # EPIPE, ECONNRESET: the proxy closed
            self.broken = True

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def read_until(self, done: Callable[[bytes], bool], what: str) -> None:
        """Read until `done(data)` or EOF; more than DEADLINE seconds of neither is a hang."""
        deadline = time.monotonic() + DEADLINE
        while not self.eof and not done(self.data):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"hang: {what}; read so far: {self.data[:300]!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
            self.data += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Malformed(AssertionError):
    """The proxy sent something that is not a well-formed HTTP/1.1 response."""


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    interim: bool = False
    complete: bool = True  # False: the data ended inside it (after a close, a cut-off answer)
    until_close: bool = False  # its body ended with the connection (so maybe cut short)

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    @property
    def closes(self) -> bool:
        return self.all(b"connection") == [b"close"]


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-9][0-9][0-9]) ([^\x00-\x08\x0a-\x1f\x7f]*)")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CHUNK_SIZE = re.compile(rb"[0-9a-f]+")
_BAD_REQUEST = (400, 408, 413, 414, 431)  # the proxy's own answers that close


def parse_answers(data: bytes, method_at: Callable[[int], bytes], eof: bool) -> list[Answer]:
    """The proxy's output as responses, strictly: what the proxy writes (status lines, `: `
    between name and value, its own framing) and nothing else. `method_at(i)` is the method
    of the request the i-th final response answers. The last answer may be incomplete."""
    answers: list[Answer] = []
    pos = 0
    finals = 0
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            if len(data) - pos > 1 << 16:
                raise Malformed(f"a response head without end: {data[pos : pos + 200]!r}")
            answers.append(Answer(0, [], complete=False))
            return answers
        lines = data[pos:end].split(b"\r\n")
        pos = end + 4
        for line in lines:
            if b"\n" in line or b"\r" in line:
                raise Malformed(f"a bare CR or LF in {line!r}")
        match = _STATUS_LINE.fullmatch(lines[0])
        if not match:
            raise Malformed(f"bad status line {lines[0]!r}")
        status = int(match.group(1))
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b": ")
            if not sep or not _NAME.fullmatch(name) or _BAD_VALUE.search(value):
                raise Malformed(f"bad header line {line!r}")
            headers.append((name, value))
        answer = Answer(status, headers)
        answers.append(answer)
        if status == 101:
            raise Malformed("101 Switching Protocols, though no request here may be upgraded")
        if status < 200:
            answer.interim = True
            continue
        method = method_at(finals)
        finals += 1
        lengths = answer.all(b"content-length")
        codings = answer.all(b"transfer-encoding")
        if len(answer.all(b"connection")) != 1:
            raise Malformed(f"not one Connection header: {headers!r}")
        if len(lengths) > 1 or (lengths and codings) or codings not in ([], [b"chunked"]):
            raise Malformed(f"ambiguous framing: {headers!r}")
        if lengths and not lengths[0].isdigit():
            raise Malformed(f"bad Content-Length: {headers!r}")
        bodyless = status in (204, 304) or (
            method == b"HEAD"
            and not (status in _BAD_REQUEST and answer.closes and answer.get(b"x-seq") is None)
        )
        if bodyless:
            pass
        elif codings:
            body, pos = _read_chunked(data, pos)
            if body is None:
                answer.complete = False
                return answers
            answer.body = body
        elif lengths:
            n = int(lengths[0])
            answer.body = data[pos : pos + n]
            if len(answer.body) < n:
                answer.complete = False
                return answers
            pos += n
        else:
            if not answer.closes:
                raise Malformed(f"a body until close on a kept-alive connection: {headers!r}")
            answer.body = data[pos:]
            answer.until_close = True
            pos = len(data)
            answer.complete = eof
        if answer.closes and pos < len(data):
            raise Malformed(f"bytes after a Connection: close answer: {data[pos : pos + 200]!r}")
    return answers


def _read_chunked(data: bytes, pos: int) -> tuple[bytes | None, int]:
    """A chunked body as the proxy writes it (bare hex sizes, no trailers); None: cut off."""
    parts = []
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None, pos
        size_line = data[pos:end]
        if not _CHUNK_SIZE.fullmatch(size_line):
            raise Malformed(f"bad chunk size line {size_line!r}")
        size = int(size_line, 16)
        pos = end + 2
        if size == 0:
            if len(data) < pos + 2:
                return None, pos
            if data[pos : pos + 2] != b"\r\n":
                raise Malformed(f"trailers or junk after the last chunk: {data[pos : pos + 50]!r}")
            return b"".join(parts), pos + 2
        if len(data) < pos + size + 2:
            return None, pos
        parts.append(data[pos : pos + size])
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("a chunk not followed by CRLF")
        pos += size + 2


def finals(answers: list[Answer]) -> list[Answer]:
    return [a for a in answers if not a.interim]


# -- the request side ------------------------------------------------------------------------------


@dataclass
class RefRequest:
    method: bytes = b""
    url: bytes = b""
    body: bytes = b""
    complete: bool = False


class RefParse:
    """The bytes a client sent, read by httptools as the proxy reads them (limits aside)."""

    def __init__(self, data: bytes) -> None:
        self.requests: list[RefRequest] = []
        self._current: RefRequest | None = None
        self._url = b""
        self._parser = httptools.HttpRequestParser(self)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.state = "upgrade"  # the rest is no HTTP to the proxy
        except httptools.HttpParserError:
            self.state = "error"
        else:
            begun = self._current is not None and not self._current.complete
            self.state = "partial" if begun or self._url else "complete"

    def on_message_begin(self) -> None:
        self._current = None
        self._url = b"\0"  # a message has begun (its URL may never come)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        request = RefRequest(self._parser.get_method(), self._url[1:])
        self.requests.append(request)
        self._current = request
        self._url = b""

    def on_body(self, body: bytes) -> None:
        assert self._current is not None
        self._current.body += body

    def on_message_complete(self) -> None:
        assert self._current is not None
        self._current.complete = True


# parts of requests; in each pair, the first list is valid HTTP the proxy must serve as it is
METHODS = (
    [b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"HEAD"],
    [b"CONNECT", b"TRACE", b"get", b"G ET", b"", b"PRI", b"M-SEARCH", b"\x00GET", b"X" * 40],
)
TARGET_PREFIXES = ([b"/"], [b"http://h.test/", b"//", b"*/", b"", b"/%2e%2e/", b"/./"])
TARGET_SUFFIXES = (
    [b"", b"/a/b", b"?q=1", b"?q=1&r=%20", b"/%41", b"/a;b", b"/"],
    [
        b"/..",
        b"/../..",
        b"%",
        b"%zz",
        b"%00",
        b"#frag",
        b"\x7f",
        b"\xff",
        b" x",
        b"\t",
        b"?\x01",
        b"/" * 40,
        b"/" + b"p" * 4200,
    ],
)
VERSIONS = (
    [b" HTTP/1.1"],
    [b" HTTP/1.0", b" HTTP/1.2", b" HTTP/2.0", b" HTTP/0.9", b" HTTP/1.1 ", b" http/1.1", b""],
)
EOLS = ([b"\r\n"], [b"\n", b"\r", b"\r\r\n"])
HOSTS = ([[(b"Host", b"x")]], [[], [(b"Host", b"x"), (b"Host", b"y")], [(b"Host", b"")]])
HEADERS = (
    [
        (b"X-A", b"b"),
        (b"Accept", b"*/*"),
        (b"Cookie", b"c" * 1000),
        (b"Expect", b"100-continue"),
        (b"X-Empty", b""),
        (b"X-Sp", b"  a  "),
        (b"Connection", b"keep-alive"),
        (b"Te", b"trailers"),
    ],
    [
        (b"X-C", b"a\x01b"),
        (b"X-D", b"a\x7fb"),
        (b"X-N", b"a\x00b"),
        (b"X-H", b"\x80\xff"),
        (b"X-F", b"a\r\n b"),
        (b"X A", b"b"),
        (b"X-A ", b"b"),
        (b"", b"b"),
        (b"X:A", b"b"),
        (b"NoColon", None),
        (b"Connection", b"close"),
        (b"Connection", b"Upgrade"),
        (b"Upgrade", b"websocket"),
        (b"Upgrade", b"h2c"),
        (b"Proxy-Connection", b"close"),
        (b"Keep-Alive", b"timeout=1"),
        (b"Cookie", b"c" * 4200),
        (b"Content-Length", b"0"),
        (b"Transfer-Encoding", b"chunked"),
    ],
)
LENGTH_VALUES = [
    b"+5",
    b" 5",
    b"5, 5",
    b"05",
    b"-1",
    b"0x5",
    b"99999999999999999999",
    b"1" * 30,
    b"5 5",
    b"",
]
CODINGS = [
    b"chunked, chunked",
    b"identity, chunked",
    b"gzip, chunked",
    b" chunked",
    b"Chunked",
    b"chunked\x00",
    b"xchunked",
    b"chunked;q=1",
    b"gzip",
    b"chunked, gzip",
]
CHUNK_SIZES = [b"zz", b"-1", b"ffffffffffffffffff", b"5 ;ext", b"0x5", b"5\x00", b" 5", b""]
EDIT_BYTES = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"0",
    b"\r\n\r\n",
    b"\r\n ",
    b"chunked",
    b"Content-Length: 3\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"\xff",
    b"%",
]

# a template is a list of byte strings and token numbers (`int`), rendered with fresh tokens;
# an edit is (kind, position, bytes)
Template = list[bytes | int]
Edit = tuple[str, int, bytes]


ASPECTS = ["method", "target", "version", "eol", "host", "headers", "many-headers", "framing"]
ASPECTS += ["upgrade"]  # a WebSocket handshake, or CONNECT: the rest is no HTTP to the proxy


@st.composite
def request_template(draw: st.DrawFn, first_token: int, clean: bool) -> tuple[Template, int]:
    """One request built from parts, with its first token: valid HTTP the proxy must serve as
    it is if `clean`, else wrong in one aspect (or, one time in nine, in any of them)."""
    focus = None if clean else draw(st.sampled_from([*ASPECTS, "any"]))
    tokens = 1

    def dirty(aspect: str) -> bool:
        return focus == aspect or (focus == "any" and draw(st.integers(0, 2)) == 0)

    def part(aspect: str, pair):  # type: ignore[no-untyped-def]
        return draw(st.sampled_from(pair[1] if dirty(aspect) else pair[0]))

    eol = part("eol", EOLS)
    upgrade = draw(st.sampled_from([b"GET", b"CONNECT"])) if dirty("upgrade") else None
    out: Template = [upgrade or part("method", METHODS), b" "]
    if dirty("target"):
        prefix, suffix = draw(st.sampled_from([(True, False), (False, True), (True, True)]))
    else:
        prefix = suffix = False
    out += [draw(st.sampled_from(TARGET_PREFIXES[prefix])), first_token]
    out += [draw(st.sampled_from(TARGET_SUFFIXES[suffix])), part("version", VERSIONS), eol]
    headers = list(part("host", HOSTS))
    if upgrade == b"GET":
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    extra = draw(st.lists(st.sampled_from(HEADERS[0]), max_size=2, unique=True))
    if dirty("headers"):
        extra += draw(st.lists(st.sampled_from(HEADERS[1]), min_size=1, max_size=2))
    for header in draw(st.permutations(extra)):
        headers.insert(draw(st.integers(0, len(headers))), header)
        if header == (b"Upgrade", b"websocket") and draw(st.booleans()):
            headers.append((b"Connection", b"Upgrade"))  # a WebSocket handshake
    if dirty("many-headers"):
        headers += [(b"X-M", b"v")] * draw(st.sampled_from([100, 400, 1001]))
    # the body and its framing
    body = draw(st.binary(max_size=24))
    framings = ["none", "length", "chunked"]
    if dirty("framing"):
        framings = ["bad-length", "lie", "two-lengths", "both", "coding", "bad-chunk", "smuggle"]
    framing = draw(st.sampled_from(framings))
    tail: Template = [body]
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing in ("chunked", "bad-chunk"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        cut = draw(st.integers(0, len(body)))
        chunks = [c for c in (body[:cut], body[cut:]) if c]
        ext = draw(st.sampled_from([b"", b";a=b"]))
        tail = [b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks]
        tail.append(b"0\r\n" + draw(st.sampled_from([b"", b"X-T: 1\r\n"])) + b"\r\n")
        if framing == "bad-chunk":
            tail.insert(0, draw(st.sampled_from(CHUNK_SIZES)) + b"\r\nhello\r\n")
    elif framing == "bad-length":
        headers.append((b"Content-Length", draw(st.sampled_from(LENGTH_VALUES))))
    elif framing == "lie":
        headers.append((b"Content-Length", b"%d" % draw(st.integers(0, 60))))
    elif framing == "two-lengths":
        second = len(body) + draw(st.integers(0, 1))
        headers += [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % second)]
    elif framing == "both":
        both = [(b"Content-Length", b"%d" % len(body)), (b"Transfer-Encoding", b"chunked")]
        headers += draw(st.permutations(both))
        tail = [b"0\r\n\r\n", body]
    elif framing == "coding":
        headers.append((b"Transfer-Encoding", draw(st.sampled_from(CODINGS))))
        tail = [b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)]
    elif framing == "smuggle":
        # a body that holds a request: only framing read two ways can make it one
        framed = [(b"Content-Length", b"5")] + [(b"Transfer-Encoding", c) for c in CODINGS[:5]]
        headers.append(draw(st.sampled_from(framed)))
        tail = [b"0\r\n\r\nGET /", first_token + 1, b" HTTP/1.1\r\nHost: x\r\n\r\n"]
        tokens = 2
    elif framing == "none":
        tail = []
    for name, value in headers:
        out += [name] if value is None else [name, b": ", value]
        out.append(eol)
    out.append(eol)
    out += tail
    return out, tokens


@dataclass
class RequestCase:
    template: Template
    tokens: int
    clean: bool  # valid keep-alive HTTP/1.1 requests: each must be answered by the target
    edits: list[Edit] = field(default_factory=list)
    splits: list[int] = field(default_factory=list)
    half_close: bool = False

    def render(self, tokens: list[bytes]) -> bytes:
        data = b"".join(tokens[p] if isinstance(p, int) else p for p in self.template)
        for kind, where, what in self.edits:
            at = where % (len(data) + 1)
            if kind == "set" and at < len(data):
                data = data[:at] + what[:1] + data[at + 1 :]
            elif kind == "insert":
                data = data[:at] + what + data[at:]
            elif kind == "delete":
                data = data[:at] + data[at + len(what) :]
            elif kind == "truncate":
                data = data[:at]
        return data


edits = st.lists(
    st.tuples(
        st.sampled_from(["set", "insert", "delete", "truncate"]),
        st.integers(0, 1 << 16),
        st.sampled_from(EDIT_BYTES) | st.binary(min_size=1, max_size=4),
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def request_floods(draw: st.DrawFn) -> RequestCase:
    """More pipelined requests than the proxy parses ahead (32), and reads larger than it
    parses at once (16 KiB): a big body among them, maybe one bad request."""
    count = draw(st.integers(20, 60))
    big = draw(st.sampled_from([None, *range(count)]))
    bad = draw(st.sampled_from([None, *range(count)]))
    template: Template = []
    used = 0
    for i in range(count):
        if i == big:
            size = draw(st.sampled_from([16 * 1024, 20_000, 40_000]))
            template += [
                b"POST /",
                used,
                b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size,
            ]
            template.append(b"b" * size)
            used += 1
        elif i == bad:
            part, n = draw(request_template(used, clean=False))
            template += part
            used += n
        else:
            template += [b"GET /", used, b" HTTP/1.1\r\nHost: x\r\n\r\n"]
            used += 1
    return RequestCase(template, used, bad is None)


@st.composite
def request_cases(draw: st.DrawFn) -> RequestCase:
    kinds = ["noise", "clean", "clean", "mixed", "mixed", "edited", "edited", "flood"]
    kind = draw(st.sampled_from(kinds))
    if kind == "noise":
        case = RequestCase([draw(st.binary(max_size=300))], 0, False)
    elif kind == "flood":
        case = draw(request_floods())
    else:
        template: Template = []
        used = 0
        clean = True
        for _ in range(draw(st.integers(1, 3))):
            dirty = kind != "clean" and draw(st.booleans())
            part, n = draw(request_template(used, clean=not dirty))
            template += part
            used += n
            clean = clean and not dirty
        case = RequestCase(template, used, clean and kind != "edited")
        if kind == "edited":
            case.edits = draw(edits)
    case.splits = sorted(draw(st.lists(st.integers(0, 1 << 16), max_size=3)))
    case.half_close = draw(st.sampled_from([False, False, False, True]))
    return case


@pytest.fixture(scope="module")
def request_rig() -> Iterator[tuple[FuzzProxy, EchoBackend]]:
    backend = EchoBackend()
    proxy = start_proxy(
        "--default-target",
        backend.url,
        "--max-header-size",
        str(MAX_HEADER_SIZE),
        "--headers-timeout",
        "2000",
    )
    yield proxy, backend
    try:
        assert_clean_log(proxy, (0, 0))
        probe(proxy, backend, b"/still-serving")
    finally:
        proxy.stop()
        backend.stop()
        output = proxy.log_since((0, 0))
        assert "Traceback" not in output, output
        assert "Uncaught" not in output, output


def probe(proxy: Proxy, backend: EchoBackend, path: bytes) -> None:
    """A plain request on a new connection gets its own answer, whole."""
    wire = Wire(proxy)
    try:
        wire.send(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        wire.read_until(
            lambda data: bool(answered(data, lambda i: b"GET")), f"probe {path!r} unanswered"
        )
        answers = finals(parse_answers(wire.data, lambda i: b"GET", wire.eof))
        assert answers and answers[0].complete, f"probe {path!r}: {wire.data!r}"
        answer = answers[0]
        assert answer.status == 200, f"probe {path!r}: {wire.data!r}"
        assert answer.body == b"ok " + path, f"probe {path!r} got another answer: {wire.data!r}"
        seq = int(answer.get(b"x-seq") or b"0")
        assert backend.seen[seq].target == path
        assert len(answers) == 1, f"probe {path!r}: more than one answer: {wire.data!r}"
    finally:
        wire.close()


def answered(data: bytes, method_at: Callable[[int], bytes], count: int = 1) -> list[Answer]:
    """The first `count` complete final answers in `data` if there are that many, else []."""
    try:
        done = [a for a in finals(parse_answers(data, method_at, False)) if a.complete]
    except Malformed:
        return [Answer(0, [])]  # stop reading; the caller's parse reports it
    return done if len(done) >= count else []


@FUZZ_SETTINGS
@given(case=request_cases())
def test_arbitrary_request_bytes(
    request_rig: tuple[FuzzProxy, EchoBackend], case: RequestCase
) -> None:
    """Whatever a client sends: well-formed answers or a close, in bounded time; each answer
    from the target names the request at its position; the target receives only requests the
    proxy parsed, with the bodies it parsed; the proxy logs no traceback and serves on."""
    check_request_case(request_rig, case)


def pipeline(*requests: bytes) -> RequestCase:
    """A fixed case: requests whose `{}` is replaced by a token each."""
    template: Template = []
    for i, request in enumerate(requests):
        before, _, after = request.partition(b"{}")
        template += [before, i, after]
    return RequestCase(template, len(requests), False)


UPGRADE = b"GET /{} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
PLAIN = b"GET /{} HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "case",
    [
        # a refused WebSocket upgrade: the bytes after it were written to the target before
        # any 101, and the target's connection then pooled with the request they hold
        pytest.param(pipeline(UPGRADE, PLAIN), id="refused-upgrade-then-request"),
        # an upgrade request (CONNECT, WebSocket) pipelined behind another request: the bytes
        # after it are written to the *first* request's target connection, which is pooled
        pytest.param(
            pipeline(PLAIN, b"CONNECT /{} HTTP/1.1\r\nHost: x\r\n\r\n", PLAIN),
            id="request-after-pipelined-connect",
        ),
        pytest.param(pipeline(PLAIN, UPGRADE, PLAIN), id="request-after-pipelined-upgrade"),
        # a WebSocket handshake with a body: the head goes to the target, the body waits for
        # a 101 that the target, waiting for the body, never sends; reading is paused, so not
        # even the client's half-close ends it
        pytest.param(
            pipeline(UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 1\r\n\r\nx")),
            id="upgrade-request-with-a-body",
        ),
        # found by the property, and fine: pinned so they stay so
        pytest.param(
            pipeline(
                b"POST /{} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Length: 5\r\n\r\n0\r\n\r\n",
                PLAIN,
            ),
            id="length-and-chunked",
        ),
        pytest.param(pipeline(b"G", PLAIN), id="garbage-then-request"),
    ],
)
def test_request_regressions(request_rig: tuple[FuzzProxy, EchoBackend], case: RequestCase) -> None:
    """Cases the property found (or must keep finding), run every time."""
    check_request_case(request_rig, case)


def check_request_case(rig: tuple[FuzzProxy, EchoBackend], case: RequestCase) -> None:
    proxy, backend = rig
    mark = proxy.mark()
    tokens = new_tokens(case.tokens + 2)
    sentinel_token, probe_token = tokens[-2:]
    ours = set(tokens)
    data = case.render(tokens)
    sentinel = b"GET /" + sentinel_token + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = data if case.half_close else data + sentinel
    ref = RefParse(stream)
    say(f"sent: {stream!r}")
    say(f"httptools reads {len(ref.requests)} requests, then {ref.state}")
    first_seq = max(backend.seen, default=0)

    def method_at(i: int) -> bytes:
        return ref.requests[i].method if i < len(ref.requests) else b"GET"

    wire = Wire(proxy)
    try:
        cuts = [0, *sorted(s % (len(data) + 1) for s in case.splits), len(data)]
        for a, b in itertools.pairwise(cuts):
            if a > 0:
                time.sleep(0.002)  # most often, a read of its own for each piece
            wire.send(data[a:b])
        if case.half_close:
            wire.half_close()
            wire.read_until(lambda _: False, "no close after the client's half-close")
        else:
            wire.send(sentinel)
            if ref.state == "complete":
                # the connection is idle after the sentinel: its answer must come, or a close
                count = len(ref.requests)
                wire.read_until(
                    lambda d: bool(answered(d, method_at, count)),
                    "a complete request left unanswered",
                )
            elif ref.state == "partial":
                wire.half_close()  # waiting for the rest is fine; a half-close ends that
                wire.read_until(lambda _: False, "no close after the client's half-close")
            else:  # an error, or bytes after an upgrade request: the proxy must close
                wire.read_until(lambda _: False, "no close after a bad request")
    finally:
        wire.close()
    say(f"received: {wire.data!r}")

    answers = finals(parse_answers(wire.data, method_at, wire.eof))
    seqs = []
    for i, answer in enumerate(answers):
        assert answer.complete or (i == len(answers) - 1 and wire.eof), "a cut-off answer"
        seq_header = answer.get(b"x-seq")
        if seq_header is None:
            continue  # the proxy's own answer (400, 431, 408, 500, ...)
        # the target's answer: it must answer the request at this position
        assert i < len(ref.requests), f"answer {i} from the target, to no request"
        request = ref.requests[i]
        seen = backend.seen[int(seq_header)]
        seqs.append(seen.seq)
        target = bytes.fromhex((answer.get(b"x-target") or b"").decode())
        assert target == seen.target
        if answer.complete and request.method != b"HEAD" and answer.status != 204:
            assert answer.body == b"ok " + target, f"answer {i}: {answer.body!r}"
        assert set(tokens_in(target)) <= set(tokens_in(request.url)), (
            f"answer {i} names {target!r}, but its request was for {request.url!r}"
        )
        assert seen.method == request.method, f"answer {i}: {seen.method!r} != {request.method!r}"
        if request.complete:
            assert seen.body == request.body, f"answer {i}: the target got another body"
    assert seqs == sorted(seqs), "answers out of order"

    if case.clean and not case.half_close:
        assert ref.state == "complete", "(test bug) a clean case httptools does not read whole"
        assert len(answers) == len(ref.requests), f"{len(ref.requests)} requests, {answers}"
        for request, answer in zip(ref.requests, answers, strict=True):
            assert answer.status == 200 and answer.get(b"x-seq") is not None, answer
            target = bytes.fromhex((answer.get(b"x-target") or b"").decode())
            assert tokens_in(target) == tokens_in(request.url)

    probe(proxy, backend, b"/" + probe_token)

    # what reached the target, against what the proxy parsed: the target may see fewer
    # requests (errors, a close), never others, never in another order
    parsed = [t for r in ref.requests for t in tokens_in(r.url)[:1] if t in ours]
    received = [
        tokens_in(s.target)[0]
        for s in backend.records()
        if s.seq > first_seq and tokens_in(s.target) and tokens_in(s.target)[0] in ours
    ]
    received = [t for t in received if t != probe_token]
    it = iter(parsed)
    assert all(t in it for t in received), (
        f"the target received requests {received}; the proxy parsed {parsed}"
    )
    by_token = {tokens_in(r.url)[0]: r for r in ref.requests if tokens_in(r.url)}
    for seen in backend.records():
        request = by_token.get(tokens_in(seen.target)[0]) if tokens_in(seen.target) else None
        if seen.seq > first_seq and request is not None and request.complete:
            assert (seen.method, seen.body) == (request.method, request.body), (
                f"the target got {seen}, the proxy parsed {request}"
            )
    assert_clean_log(proxy, mark)


# -- the response side ----------------------------------------------------------------------------


REQUEST_BODIES = {b"POST": b"abc"}


@dataclass
class RefResponse:
    """How h11, a strict client, reads a target's bytes: `status` None if it reads no whole
    final response (`incomplete`: it wants more bytes, else it refuses them)."""

    status: int | None = None
    body: bytes = b""
    extra: bool = False  # bytes after the response (beyond CR and LF)
    trailing: bool = False  # bytes after the response (any)
    incomplete: bool = False


def reference_response(script: bytes, method: bytes, closes: bool) -> RefResponse:
    conn = h11.Connection(h11.CLIENT)
    body = REQUEST_BODIES.get(method, b"")
    headers = [("Host", "x"), ("Content-Length", str(len(body)))]
    conn.send(h11.Request(method=method, target="/x", headers=headers))
    conn.send(h11.Data(data=body))
    conn.send(h11.EndOfMessage())
    if script:
        conn.receive_data(script)  # (b"" would mean EOF)
    if closes:
        conn.receive_data(b"")
    ref = RefResponse()
    body = []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return RefResponse(incomplete=True)
            if isinstance(event, h11.Response):
                ref.status = event.status_code
            elif isinstance(event, h11.Data):
                body.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                ref.body = b"".join(body)
                ref.extra = bool(conn.trailing_data[0].strip(b"\r\n"))
                ref.trailing = bool(conn.trailing_data[0])
                return ref
            elif not isinstance(event, h11.InformationalResponse):
                return RefResponse()
    except h11.RemoteProtocolError:
        return RefResponse()


STATUSES = [
    b"200",
    b"201",
    b"204",
    b"206",
    b"301",
    b"302",
    b"304",
    b"101",
    b"100",
    b"199",
    b"400",
    b"404",
    b"500",
    b"503",
    b"599",
    b"600",
    b"999",
    b"000",
    b"099",
    b"1000",
    b"20",
    b"2x0",
    b"",
]
RESPONSE_VERSIONS = [b"HTTP/1.1"] * 4 + [b"HTTP/1.0", b"HTTP/2", b"HTTP/1.2", b"http/1.1", b"ICY"]
REASONS = [b"OK", b"", b"Whatever", b"\x01", b"caf\xe9", b"A" * 300, b"OK\x00", b"OK\r"]
RESPONSE_HEADERS = [
    (b"Content-Type", b"text/plain"),
    (b"Set-Cookie", b"a=b"),
    (b"Location", b"http://127.0.0.1:1/x"),
    (b"Connection", b"close"),
    (b"Connection", b"keep-alive"),
    (b"Connection", b"upgrade"),
    (b"Upgrade", b"websocket"),
    (b"Keep-Alive", b"timeout=1"),
    (b"Proxy-Connection", b"close"),
    (b"Trailer", b"X-T"),
    (b"X-N", b"a\x00b"),
    (b"X-C", b"a\x01b"),
    (b"X-F", b"a\r\n b"),
    (b"Bad Name", b"v"),
    (b" X", b"v"),
    (b"X-Big", b"v" * 5000),
    (b"X-Long", b"v" * 1000),
]
INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n",
]


@st.composite
def response_bytes(draw: st.DrawFn) -> bytes:
    """A response built from parts, framing right or wrong, maybe followed by more."""
    out = b"".join(draw(st.lists(st.sampled_from(INTERIM), max_size=2)))
    version = draw(st.sampled_from(RESPONSE_VERSIONS))
    status = draw(st.sampled_from(STATUSES))
    out += version + b" " + status + b" " + draw(st.sampled_from(REASONS)) + b"\r\n"
    headers = draw(st.lists(st.sampled_from(RESPONSE_HEADERS), max_size=4))
    if draw(st.integers(0, 9)) == 0:
        headers += [(b"X-M", b"v")] * draw(st.sampled_from([100, 300, 1001]))
    body = draw(st.binary(max_size=30))
    framings = ["close", "length", "length", "short", "long", "two-lengths", "bad-length"]
    framings += ["chunked", "chunked", "bad-chunk", "both", "coding"]
    framing = draw(st.sampled_from(framings))
    tail = body
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "short":
        headers.append((b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 9)))))
    elif framing == "long":
        headers.append((b"Content-Length", b"%d" % max(0, len(body) - draw(st.integers(1, 9)))))
    elif framing == "two-lengths":
        extra = draw(st.integers(0, 1))
        headers += [
            (b"Content-Length", b"%d" % len(body)),
            (b"Content-Length", b"%d" % (len(body) + extra)),
        ]
    elif framing == "bad-length":
        headers.append((b"Content-Length", draw(st.sampled_from(LENGTH_VALUES))))
    elif framing in ("chunked", "bad-chunk", "both", "coding"):
        coding = b"chunked" if framing != "coding" else draw(st.sampled_from(CODINGS))
        headers.append((b"Transfer-Encoding", coding))
        cut = draw(st.integers(0, len(body)))
        chunks = [c for c in (body[:cut], body[cut:]) if c]
        ext = draw(st.sampled_from([b"", b";a=b"]))
        tail = b"".join(b"%x%s\r\n%s\r\n" % (len(c), ext, c) for c in chunks)
        if framing == "bad-chunk":
            tail = draw(st.sampled_from(CHUNK_SIZES)) + b"\r\nhello\r\n" + tail
        tail += b"0\r\n" + draw(st.sampled_from([b"", b"X-T: 1\r\n"])) + b"\r\n"
        if framing == "both":
            headers.append((b"Content-Length", b"%d" % len(tail)))
    headers = draw(st.permutations(headers)) if len(headers) < 8 else headers
    out += b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + tail
    more = draw(
        st.sampled_from(
            [b"", b"", b"\r\n", b"HTTP/1.1 2", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"]
        )
        | st.binary(min_size=1, max_size=8)
    )
    return out + more


@dataclass
class ResponseCase:
    script: bytes
    method: bytes = b"GET"
    keep_open: bool = False  # the target keeps its connection open after the script
    http10: bool = False
    edits: list[Edit] = field(default_factory=list)
    splits: list[int] = field(default_factory=list)

    def render(self) -> bytes:
        return RequestCase([self.script], 0, False, self.edits).render([])


@st.composite
def response_cases(draw: st.DrawFn) -> ResponseCase:
    if draw(st.integers(0, 3)) == 0:
        script = draw(st.binary(max_size=200))
    else:
        script = draw(response_bytes())
    case = ResponseCase(
        script,
        method=draw(st.sampled_from([b"GET", b"GET", b"HEAD", b"POST"])),
        keep_open=draw(st.booleans()),
        http10=draw(st.integers(0, 7)) == 0,
    )
    if draw(st.booleans()):
        case.edits = draw(edits)
    case.splits = draw(st.lists(st.integers(0, 1 << 16), max_size=2))
    return case


@pytest.fixture(scope="module")
def response_rig() -> Iterator[tuple[FuzzProxy, HostileUpstream, EchoBackend]]:
    hostile = HostileUpstream()
    healthy = EchoBackend()
    proxy = start_proxy(
        "--max-header-size",
        str(MAX_HEADER_SIZE),
        "--proxy-timeout",
        "2000",
    )
    proxy.add_route("/hostile", hostile.url)
    proxy.add_route("/healthy", healthy.url)
    yield proxy, hostile, healthy
    try:
        assert_clean_log(proxy, (0, 0))
        probe(proxy, healthy, b"/healthy/still-serving")
    finally:
        proxy.stop()
        hostile.stop()
        healthy.stop()
        output = proxy.log_since((0, 0))
        assert "Traceback" not in output, output
        assert "Uncaught" not in output, output


def exchange(wire: Wire, request: bytes, method: bytes, what: str) -> Answer | None:
    """Send `request` on `wire`, read its final answer (None: the proxy closed first). Earlier
    answers on the wire must have been read (their bytes are dropped here)."""
    wire.data = b""
    wire.send(request)
    wire.read_until(lambda d: bool(answered(d, lambda i: method)), what)
    answers = parse_answers(wire.data, lambda i: method, wire.eof)
    final = finals(answers)
    for answer in answers:
        assert answer.interim or answer is final[0], "interim answers after the final one"
    if not final or not final[0].complete:
        assert wire.eof
        return None
    assert len(final) == 1, f"more than one answer to one request: {wire.data!r}"
    return final[0]


@FUZZ_SETTINGS
@given(case=response_cases())
def test_arbitrary_response_bytes(
    response_rig: tuple[FuzzProxy, HostileUpstream, EchoBackend], case: ResponseCase
) -> None:
    """Whatever a target answers: the client gets a well-formed response (the target's, as a
    strict client reads it, or the proxy's 503) or a close; nothing of it reaches the next
    request on that connection, nor another route, and the proxy serves on."""
    check_response_case(response_rig, case)


EVIL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"


@pytest.mark.parametrize(
    "case",
    [
        # a status below 100 is relayed as an interim response ("HTTP/1.1 0 OK"), the
        # proxy's 503 after it
        pytest.param(ResponseCase(b"HTTP/1.1 000 OK\r\n\r\n"), id="status-000"),
        pytest.param(ResponseCase(b"HTTP/1.1 099 OK\r\n\r\n"), id="status-099"),
        # control characters in the reason phrase are relayed as they are
        pytest.param(
            ResponseCase(b"HTTP/1.1 200 OK\x00\r\nContent-Length: 0\r\n\r\n"),
            id="reason-with-nul",
        ),
        pytest.param(
            ResponseCase(b"HTTP/1.1 200 \x01\r\nContent-Length: 0\r\n\r\n"),
            id="reason-with-control",
        ),
        # a response to HEAD without a length, then more bytes: the connection is pooled
        # (the bytes are read as the HEAD response's body, and dropped)
        pytest.param(
            ResponseCase(b"HTTP/1.1 200 OK\r\n\r\n" + EVIL, method=b"HEAD", keep_open=True),
            id="head-response-then-more",
        ),
        # found by the property, or close to it, and fine: pinned so they stay so
        pytest.param(ResponseCase(EVIL + EVIL, keep_open=True), id="two-responses-to-one-request"),
        pytest.param(
            ResponseCase(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n" + EVIL,
                keep_open=True,
            ),
            id="101-to-a-plain-request",
        ),
        pytest.param(ResponseCase(b"", keep_open=True), id="nothing-then-close"),
        pytest.param(
            ResponseCase(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"),
            id="short-body-then-close",
        ),
        pytest.param(
            ResponseCase(b"HTTP/1.1 100 Continue\r\n\r\n" + EVIL, method=b"POST"),
            id="100-continue-then-response",
        ),
        pytest.param(
            ResponseCase(b"HTTP/1.1 200 OK\r\n\r\nuntil close", http10=True),
            id="until-close-to-http10",
        ),
        pytest.param(
            ResponseCase(b"HTTP/1.1 200 OK\r\n\r\n\r\n", method=b"HEAD", splits=[19]),
            id="head-response-crlf-close",
        ),
    ],
)
def test_response_regressions(
    response_rig: tuple[FuzzProxy, HostileUpstream, EchoBackend], case: ResponseCase
) -> None:
    """Cases the property found (or must keep finding), run every time."""
    check_response_case(response_rig, case)


def check_response_case(
    rig: tuple[FuzzProxy, HostileUpstream, EchoBackend], case: ResponseCase
) -> None:
    proxy, hostile, healthy = rig
    hostile.reset()
    mark = proxy.mark()
    script = case.render()
    ref = reference_response(script, case.method, not case.keep_open)
    # the target keeps its connection open only after a whole response: after anything else,
    # only --proxy-timeout would end the wait (correct, but slow)
    keep_open = case.keep_open and ref.status is not None
    if keep_open != case.keep_open:
        ref = reference_response(script, case.method, True)
    # sent in pieces, unless the pieces could arrive after the proxy judged the connection
    cuts = [0, *sorted(s % (len(script) + 1) for s in case.splits), len(script)]
    pieces = [script[a:b] for a, b in itertools.pairwise(cuts)]
    if keep_open and ref.extra:
        pieces = [script]
    hostile.act(pieces, keep_open, ref.extra)
    say(f"target sends: {script!r}; keeps its connection open: {keep_open}")
    say(f"h11 reads: {ref}")
    tok = new_tokens(5)

    def good_or_stale(answer: Answer, path: bytes) -> bool:
        """The target's good answer; or the proxy's 503 if the target closed its connection
        after bytes past its response: the proxy may have lent it out again before the close
        arrived, and cannot retry a request whose connection sent something (CR LF, say)."""
        if (answer.status, answer.body) == (200, b"ok " + path):
            return True
        stale = not keep_open and (ref.status is None or ref.trailing)
        return stale and answer.status == 503 and b"hubproxy" in answer.body

    version = b"HTTP/1.0" if case.http10 else b"HTTP/1.1"

    wire = Wire(proxy)
    try:
        path = b"/hostile/" + tok[0]
        body = REQUEST_BODIES.get(case.method, b"")
        answer = exchange(
            wire,
            b"%s %s %s\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (case.method, path, version, len(body), body),
            case.method,
            "no answer to a request to a hostile target",
        )
        say(f"client got: {wire.data!r}")
        retried = (
            not script
            and answer is not None
            and answer.get(b"content-length") == b"%d" % len(b"ok " + path)
            and answer.body in (b"", b"ok " + path)
        )
        # a response the proxy relayed: where h11 reads one, it is the same (the exception: a
        # reused connection closed without a byte is retried on a new one). A body until close
        # (to HTTP/1.0) may have been cut short: a close is all the proxy can say then. (What
        # h11 refuses, llhttp may accept: no rule for that.)
        if answer is not None and answer.status != 503 and not retried and ref.status is not None:
            assert answer.status == ref.status, f"{answer.status} relayed, h11: {ref.status}"
            if answer.until_close:
                assert ref.body.startswith(answer.body), f"{answer.body!r}, h11: {ref.body!r}"
            else:
                assert answer.body == ref.body, f"{answer.body!r} relayed, h11: {ref.body!r}"
        if answer is not None and not answer.closes and not wire.eof:
            # the same connection, the same route: the target now answers well
            path = b"/hostile/" + tok[1]
            again = exchange(
                wire,
                b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path,
                b"GET",
                "no answer to a second request",
            )
            say(f"second answer: {wire.data!r}")
            assert again is not None, "closed without an answer"
            assert good_or_stale(again, path), wire.data
            # the same connection, a healthy route
            path = b"/healthy/" + tok[2]
            again = exchange(
                wire,
                b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path,
                b"GET",
                "no answer to a request to a healthy target",
            )
            assert again is not None, "closed without an answer"
            assert (again.status, again.body) == (200, b"ok " + path), wire.data
    finally:
        wire.close()
    probe(proxy, healthy, b"/healthy/" + tok[3])
    # the hostile route again, on a new connection: a pooled connection to it must be clean
    wire = Wire(proxy)
    try:
        path = b"/hostile/" + tok[4]
        again = exchange(
            wire, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path, b"GET", "no answer to a probe"
        )
        assert again is not None and good_or_stale(again, path), wire.data
    finally:
        wire.close()
    with hostile.lock:
        reused, hostile.reused_after_extra[:] = list(hostile.reused_after_extra), []
    assert not reused, (
        f"a target connection was reused after it sent more than its answer: {reused}"
    )
    kept = hostile.still_tainted()
    assert not kept, f"target connections kept open after they sent more than an answer: {kept}"
    assert_clean_log(proxy, mark)
