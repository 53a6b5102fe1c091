"""Canaries for `forwarder.compat`: one test per place where the forwarder leans on undocumented
or private behaviour of gevent, gunicorn, urllib3 or requests (listed in that package's
docstring), plus the failure classification in `forwarder.upstream` that depends on the
exception types and chains those libraries raise. Each test drives the real library (tiny local
servers, gevent socketpairs, gunicorn's own worker and response objects) and fails with a message
naming the assumption an upgrade broke and the forwarder code that has to change with it."""

import _socket
import contextlib
import inspect
import os
import socket
import threading

import gevent
import gevent.socket
import gevent.server
import gunicorn.workers.base
from gunicorn.workers import ggevent
import requests
import urllib3.connection
import urllib3.response
from gunicorn.config import Config
from gunicorn.http.parser import RequestParser
from gunicorn.http.wsgi import Response

from forwarder import upstream
from forwarder.compat.client import BackendAdapter, StaleConnection, send_prepared
from forwarder.compat.server import (GeventWorker, _ClientSocket, close_connection, write_now,
                                     operator_access_log_format, raw_socket)
from tests.harness import closed_port

WAIT = 5  # bound on every wait; a passing test takes milliseconds
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# --- tiny servers -------------------------------------------------------------------------------

@contextlib.contextmanager
def serving(*handlers):
    """A TCP server on 127.0.0.1 that hands its n-th accepted connection to `handlers[n]`; yields
    (port, done), `done` an Event the handlers may wait on and that is set on the way out."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(WAIT)
    done = threading.Event()

    def serve():
        for handler in handlers:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT)
                try:
                    handler(conn, done)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], done
    finally:
        done.set()
        server.close()
        thread.join(WAIT)


def read_request(conn) -> "tuple[bytes, bytes]":
    """One HTTP/1.1 request off `conn`: its head (request line and headers) and its body."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = conn.recv(65536)
        if not piece:
            raise ConnectionError("closed mid-request")
        data += piece
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


# --- gevent -------------------------------------------------------------------------------------

def test_raw_socket_is_the_os_level_socket_and_never_waits():
    left, right = gevent.socket.socketpair()
    with left, right:
        left.setblocking(True)  # as gunicorn's gevent worker does with every client socket
        try:
            raw = raw_socket(left)
        except AttributeError:
            raw = None
        assert isinstance(raw, _socket.socket) and not isinstance(raw, gevent.socket.socket), (
            "gevent no longer exposes the OS-level socket as `_sock` (got %r); "
            "forwarder.compat.server.raw_socket must change" % type(raw))
        assert raw.getblocking() is False, (
            "the OS-level socket under a blocking gevent socket no longer is non-blocking: "
            "forwarder.relay.client_watch would park in a recv outside the hub")
        try:
            raw.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            pass
        else:
            raise AssertionError(
                "a peek on gevent's `_sock` with nothing to read no longer raises "
                "BlockingIOError; forwarder.relay.client_watch must change")
        right.sendall(b"x")
        with gevent.Timeout(WAIT):
            gevent.socket.wait_read(left.fileno())
        assert raw.recv(1, socket.MSG_PEEK) == b"x", (
            "a peek on gevent's `_sock` no longer sees what the peer sent; "
            "forwarder.compat.server.raw_socket must change")


def client_pair(send_buffer=None):
    left, right = gevent.socket.socketpair()
    try:
        left.__class__ = _ClientSocket
    except TypeError as exc:
        left.close()
        right.close()
        raise AssertionError(
            "a live gevent socket can no longer be re-classed through `__class__` (%s); "
            "forwarder.compat.server.GeventWorker.handle must change" % exc) from exc
    if send_buffer:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    return left, right


def read_all(sock, size):
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(65536)
        assert piece, "closed early"
        data += piece
    return bytes(data)


def test_a_live_gevent_socket_can_be_reclassed_and_a_small_write_arrives():
    left, right = client_pair()
    with left, right:
        try:
            left.sendall(b"data: {}\n\n")
        except AttributeError as exc:
            raise AssertionError(
                "a gevent socket no longer has its OS-level socket in `_sock` (%s); "
                "forwarder.compat.server._ClientSocket.sendall must change" % exc) from exc
        assert gevent.spawn(read_all, right, 10).get(timeout=WAIT) == b"data: {}\n\n", (
            "a re-classed gevent socket no longer writes through `_sock.send`; "
            "forwarder.compat.server._ClientSocket must change")


def test_a_write_larger_than_the_buffers_arrives_whole_and_in_order():
    left, right = client_pair(send_buffer=4096)
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB, far past both buffers
    with left, right:
        reader = gevent.spawn(read_all, right, len(payload))
        left.sendall(payload)
        assert reader.get(timeout=WAIT) == payload, (
            "gevent's sendall no longer finishes a write that a plain `_sock.send` began; "
            "forwarder.compat.server._ClientSocket.sendall must change")


# --- gunicorn -----------------------------------------------------------------------------------

class _QuietLog:
    """The worker's log (gunicorn's own logger is no reach of the forwarder's)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


class _Listener:
    def getsockname(self):
        return ("127.0.0.1", 8000)


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


@contextlib.contextmanager
def gunicorn_worker(worker_class):
    """A gunicorn gevent worker as a gunicorn arbiter would make it, with a WSGI app."""
    worker = worker_class(0, os.getpid(), [], None, 30, Config(), _QuietLog())
    worker.wsgi = _hello
    try:
        yield worker
    finally:
        worker.tmp.close()


def serve_connection(worker, request: bytes) -> bytes:
    """Run the worker's `handle` on one connection whose client sent `request` and keeps its
    side open; what the client received until the worker closed the connection."""
    client, peer = gevent.socket.socketpair()
    worker.peer = peer
    with client, peer:
        peer.sendall(request)
        handling = gevent.spawn(worker.handle, _Listener(), client, ("127.0.0.1", 40000))
        received = gevent.spawn(read_until_closed, peer).get(timeout=2)
        handling.get(timeout=WAIT)
        return received


def read_until_closed(sock) -> bytes:
    data = b""
    while piece := sock.recv(65536):
        data += piece
    return data


def test_gunicorn_waits_for_a_keepalive_request_inside_timeout_ctx():
    class Worker(GeventWorker):
        waits = 0

        def idle_wait(self):
            # What the drain does at shutdown: end the wait silently, here after 50 ms.
            Worker.waits += 1
            return gevent.Timeout(0.05, False)

    with gunicorn_worker(Worker) as worker:
        try:
            received = serve_connection(worker, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        except gevent.Timeout:
            raise AssertionError(
                "gunicorn's async worker no longer waits for the next keep-alive request inside "
                "`self.timeout_ctx()`: the drain at shutdown (forwarder/gunicorn_worker.py) "
                "would not run") from None
    assert Worker.waits >= 2, (
        "gunicorn's async worker no longer waits for the next keep-alive request inside "
        "`self.timeout_ctx()` (entered %d times): the drain at shutdown "
        "(forwarder/gunicorn_worker.py) would not run" % Worker.waits)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b"\r\n\r\nok"), (
        "gunicorn no longer closes a connection silently when the wait in `timeout_ctx()` "
        "ends: the drain at shutdown (forwarder/gunicorn_worker.py) would send the client "
        "something else (got %r)" % received)


def test_gunicorn_calls_handle_error_after_writing_its_answer_to_an_unparsable_request():
    answered = []

    class Worker(GeventWorker):
        def after_error_answer(self, client):
            try:  # what the client has been sent by now
                answered.append(raw_socket(self.peer).recv(65536, socket.MSG_PEEK))
            except BlockingIOError:
                answered.append(b"")

    with gunicorn_worker(Worker) as worker:
        received = serve_connection(worker, b"NOT HTTP AT ALL\r\n\r\n")
    assert list(inspect.signature(gunicorn.workers.base.Worker.handle_error).parameters) == [
        "self", "req", "client", "addr", "exc"], (
        "gunicorn's `Worker.handle_error` no longer takes (req, client, addr, exc); "
        "forwarder.compat.server.GeventWorker.handle_error must change")
    assert len(answered) == 1, (
        "gunicorn no longer calls `self.handle_error(req, client, addr, exc)` for a request it "
        "could not parse: after_error_answer (forwarder/gunicorn_worker.py's linger) would not "
        "run (called %d times)" % len(answered))
    assert answered[0].startswith(b"HTTP/1.1 400 ") and answered[0] == received, (
        "gunicorn's `handle_error` no longer writes the whole error answer to an unparsable "
        "request before returning (sent by then: %r): after_error_answer would linger before "
        "the answer, not after it" % answered[0][:60])


def gunicorn_response() -> Response:
    """gunicorn's `Response` to a real parsed keep-alive HTTP/1.1 request, its status set."""
    cfg = Config()
    parser = RequestParser(cfg, iter([b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"]),
                           ("127.0.0.1", 40000))
    response = Response(next(parser), None, cfg)
    response.start_response("200 OK", [("Content-Length", "2")])
    return response


def test_close_connection_through_start_response_makes_gunicorn_answer_connection_close():
    untouched = gunicorn_response()
    assert "Connection: keep-alive\r\n" in "".join(untouched.default_headers()), (
        "gunicorn no longer answers a keep-alive HTTP/1.1 request with `Connection: "
        "keep-alive`; the test of forwarder.compat.server.close_connection must change")
    closing = gunicorn_response()
    close_connection(closing.start_response)
    assert "Connection: close\r\n" in "".join(closing.default_headers()), (
        "gunicorn's `start_response` is no longer a bound method of a `Response` whose "
        "`force_close()` makes it answer `Connection: close`; "
        "forwarder.compat.server.close_connection must change")
    assert closing.should_close(), (
        "gunicorn's `Response.force_close()` no longer ends the connection after the answer; "
        "forwarder.compat.server.close_connection must change")
    close_connection(_hello)  # another WSGI server's start_response: nothing, and no error


def test_write_now_writes_a_body_piece_through_gunicorns_response_outside_the_iteration():
    sent = []

    class Sink:
        def sendall(self, data):
            sent.append(bytes(data))

    response = gunicorn_response()
    response.sock = Sink()
    response.headers = []  # a body of unknown length: chunked, as an SSE stream's
    response.response_length = None
    response.chunked = response.is_chunked()
    left, right = socket.socketpair()
    with left, right:
        assert write_now(response.start_response, left, b": keep-alive\n\n"), (
            "gunicorn's `start_response` is no longer a bound method of a `Response` with a "
            "`write`; forwarder.compat.server.write_now must change")
    data = b"".join(sent)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"\r\n: keep-alive\n\n\r\n"), (
        "gunicorn's `Response.write` no longer sends the headers first and the piece as one "
        f"chunk ({data!r}); forwarder.compat.server.write_now must change")
    assert not write_now(_hello, None, b"x")  # another WSGI server: nothing


def test_gunicorn_makes_its_gevent_servers_from_a_module_level_stream_server():
    source = inspect.getsource(ggevent.GeventWorker.run)
    assert "StreamServer(" in source and ggevent.StreamServer, (
        "gunicorn's gevent worker no longer makes its servers from the module-level name "
        "`StreamServer`; forwarder.compat.server.GeventWorker.accepting (which spreads "
        "connections over the workers) must change")
    for name in ("start_accepting", "stop_accepting", "closed"):
        assert hasattr(gevent.server.StreamServer, name), (
            f"gevent's StreamServer no longer has `{name}`; "
            f"forwarder.compat.server.GeventWorker.accepting must change")


def test_operator_access_log_format_tells_a_set_format_from_gunicorns_default():
    cfg = Config()
    assert operator_access_log_format(cfg) is False, (
        "gunicorn's `cfg.settings['access_log_format']` no longer has value == default when "
        "unset; forwarder.compat.server.operator_access_log_format must change")
    cfg.set("access_log_format", "%(h)s")
    assert operator_access_log_format(cfg) is True, (
        "gunicorn's `cfg.settings['access_log_format'].value` no longer holds the operator's "
        "format; forwarder.compat.server.operator_access_log_format must change")


# --- requests and urllib3 -----------------------------------------------------------------------

def backend_adapter() -> BackendAdapter:
    adapter = BackendAdapter(max_retries=0, pool_block=False)
    requests.Session().mount("http://", adapter)
    return adapter


def test_backend_adapter_pools_are_installed_through_pool_classes_by_scheme():
    from forwarder.compat.client import _HTTPPool

    adapter = backend_adapter()
    pool = adapter.poolmanager.connection_from_url("http://127.0.0.1:1")
    assert adapter.poolmanager.pool_classes_by_scheme["http"] is _HTTPPool and (
        type(pool) is _HTTPPool), (
        "urllib3's PoolManager no longer makes its pools from `pool_classes_by_scheme` (got "
        "%r); forwarder.compat.client.BackendAdapter must change" % type(pool))
    assert type(pool._new_conn()).__name__ == "BackendHTTPConnection", (
        "urllib3's pool no longer makes its connections from `ConnectionCls`; "
        "forwarder.compat.client._HTTPPool must change")
    assert isinstance(inspect.getattr_static(urllib3.connection.HTTPConnection, "is_connected"),
                      property), (
        "urllib3's HTTPConnection no longer has an `is_connected` property; "
        "forwarder.compat.client._connection_class must change")


def test_urllib3_asks_is_connected_before_reusing_a_pooled_connection():
    def answer_then_close(conn, done):
        read_request(conn)
        conn.sendall(OK)  # keep-alive, and closed at once: a backend's idle timeout

    closed = threading.Event()

    def close_first(conn, done):
        answer_then_close(conn, done)
        conn.close()
        closed.set()

    adapter = backend_adapter()
    with serving(close_first, answer_then_close) as (port, _):
        url = f"http://127.0.0.1:{port}/v1/models"
        pool = adapter.get_connection_with_tls_context(
            requests.Request("GET", url).prepare(), verify=True)  # the pool send uses
        asked = []

        class Probe(pool.ConnectionCls):
            @property
            def is_connected(self):
                answer = super().is_connected
                asked.append(answer)
                return answer

        pool.ConnectionCls = Probe
        first = send_prepared(adapter, "GET", url, {}, None, (WAIT, WAIT))
        assert first.raw.read() == b"ok"
        assert closed.wait(WAIT)
        try:
            second = send_prepared(adapter, "GET", url, {}, None, (WAIT, WAIT))
        except StaleConnection:
            raise AssertionError(
                "urllib3 no longer drops a pooled connection the backend closed before reusing "
                "it; forwarder.compat.client's `is_connected` must change") from None
        assert second.raw.read() == b"ok"
    assert False in asked, (
        "urllib3 no longer asks a pooled connection's `is_connected` before reusing it "
        "(asked: %r): forwarder.compat.client's cheap check is bypassed" % asked)


def test_stale_connection_passes_through_urllib3_and_requests_unwrapped():
    accepted = []

    def answer_once_then_close_unanswered(conn, done):
        accepted.append(conn)
        read_request(conn)
        conn.sendall(OK)
        read_request(conn)  # the second request, on the kept-alive connection: no answer

    adapter = backend_adapter()
    with serving(answer_once_then_close_unanswered) as (port, _):
        url = f"http://127.0.0.1:{port}/v1/models"
        first = send_prepared(adapter, "GET", url, {}, None, (WAIT, WAIT))
        assert first.raw.read() == b"ok"  # whole: the connection is back in the pool
        try:
            send_prepared(adapter, "GET", url, {}, None, (WAIT, WAIT))
        except StaleConnection:
            pass
        except Exception as exc:
            raise AssertionError(
                "urllib3 or requests now wraps an exception that is none of theirs nor an "
                "OSError (got %r): forwarder.compat.client.StaleConnection would not reach "
                "forwarder.upstream.send" % exc) from exc
        else:
            raise AssertionError("a connection closed unanswered gave a response")
    assert len(accepted) == 1, "the second request did not reuse the pooled connection"


def test_send_prepared_sends_a_hand_built_request_as_given():
    received = []

    def record(conn, done):
        received.append(read_request(conn))
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\ndone")

    body = b'{"model": "m", "prompt": "\xc3\xa9"}'
    with serving(record) as (port, _):
        response = send_prepared(
            backend_adapter(), "POST", f"http://127.0.0.1:{port}/v1/completions?a=1&b=%2F",
            {"X-Request-Id": "abc", "Content-Type": "application/json"}, body, (WAIT, WAIT))
        raw = response.raw
        assert isinstance(raw, urllib3.response.HTTPResponse) and hasattr(raw, "read1"), (
            "requests' `Response.raw` is no longer urllib3's response with `read1` (got %r); "
            "forwarder.upstream.send and the relay must change" % type(raw))
        assert (response.status_code, raw.read1(100)) == (201, b"done")
    head, sent = received[0]
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert lines[0] == "POST /v1/completions?a=1&b=%2F HTTP/1.1", (
        "requests' HTTPAdapter.send no longer sends a hand-built PreparedRequest's method and "
        "URL as given (got %r); forwarder.compat.client.send_prepared must change" % lines[0])
    assert (headers.get("X-Request-Id"), headers.get("Content-Length"), sent) == (
        "abc", str(len(body)), body), (
        "requests' HTTPAdapter.send no longer sends a hand-built PreparedRequest's headers and "
        "body as given (got %r, %r); forwarder.compat.client.send_prepared must change"
        % (headers, sent))


# --- how forwarder.upstream reads the libraries' failures ---------------------------------------

def test_a_refused_connection_is_classified_as_connection_refused():
    try:
        with closed_port() as port:
            upstream.send("GET", f"http://127.0.0.1:{port}/x", {}, None, 2, 2)
    except upstream.ConnectFailed as exc:
        assert (str(exc), exc.stale) == ("connection refused", False), (
            "urllib3 no longer keeps the ConnectionRefusedError in the exception chain (or its "
            "NewConnectionError is no ConnectTimeoutError); forwarder.upstream.failure_reason "
            "must change (got %r, stale=%r)" % (str(exc), exc.stale))
    else:
        raise AssertionError("a connection to a closed port succeeded")


def test_no_answer_within_the_read_timeout_is_an_upstream_timeout():
    def silent(conn, done):
        read_request(conn)
        done.wait(WAIT)

    with serving(silent) as (port, _):
        try:
            upstream.send("GET", f"http://127.0.0.1:{port}/x", {}, None, WAIT, 0.3)
        except upstream.UpstreamTimeout:
            pass
        except Exception as exc:
            raise AssertionError(
                "requests no longer raises ReadTimeout for a backend silent past the read "
                "timeout (got %r); forwarder.upstream.send must change" % exc) from exc
        else:
            raise AssertionError("a silent backend gave a response")


def response_then(rest: bytes, then_close: bool):
    """A handler answering with headers for 10 bytes of body, `rest` of it, then closing or
    staying silent."""
    def handler(conn, done):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + rest)
        if not then_close:
            done.wait(WAIT)
    return handler


def body_failure(port: int) -> BaseException:
    response = upstream.send("GET", f"http://127.0.0.1:{port}/x", {}, None, WAIT, 0.3)
    try:
        while response.read1(65536):
            pass
    except Exception as exc:
        return exc
    finally:
        response.close()
    raise AssertionError("a body cut short read as a whole one")


def test_a_body_cut_short_is_classified_as_connection_closed():
    with serving(response_then(b"abc", then_close=True)) as (port, _):
        exc = body_failure(port)
    assert (upstream.failure_reason(exc), upstream.timed_out(exc)) == (
        "connection closed", False), (
        "urllib3 no longer raises ProtocolError / IncompleteRead for a body cut short (got %r); "
        "forwarder.upstream.failure_reason must change" % exc)


def test_a_read_timeout_mid_body_is_classified_as_a_timeout():
    with serving(response_then(b"abc", then_close=False)) as (port, _):
        exc = body_failure(port)
    assert upstream.timed_out(exc) is True, (
        "urllib3 no longer raises ReadTimeoutError (or a TimeoutError in its chain) for a read "
        "timeout mid-body (got %r, classified %r); forwarder.upstream.failure_reason must "
        "change" % (exc, upstream.failure_reason(exc)))
