"""The `/v1/*` proxy view: request in → pick a healthy backend → relay its answer.

Path, query string, body and headers go to the backend as the client sent them, except
hop-by-hop headers and, when `FORCED_MODEL_NAME` is set, the `model` field of a JSON-object POST
body. A backend that cannot be connected to is marked down and another is tried (nothing was sent
to it); once a request reached a backend it is not sent again, but for a connection closed
without a byte of answer (the keep-alive race: `upstream.StaleConnectionError`).
"""

import contextlib
import json
import posixpath
import time
import urllib.parse

from flask import Response, request

from . import access, relay, request_id, telemetry, upstream
from .client_watch import ClientGone, ClientWatch
from .errors import error_response
from .registry import Registry
from .routing import pick_backend


class RelayedResponse(Response):
    # A backend response without a Content-Type must not gain Flask's `text/html` default.
    default_mimetype = None


# A path still percent-encoded after this many rounds of decoding is refused.
_MAX_DECODINGS = 3


def _decoded(path: str) -> "str | None":
    """The path decoded until nothing is left to decode, or None: `%252e` is `.` to anything
    that decodes twice (a proxy before the backend, a backend's own router)."""
    for _ in range(_MAX_DECODINGS):
        decoded = urllib.parse.unquote(path)
        if decoded == path:
            return decoded
        path = decoded
    return None


def upstream_target(raw_uri: str) -> "str | None":
    """The path and query to request from the backend: the client's own bytes, or None when the
    path would leave `/v1/` once decoded and normalised (the backend must see nothing else)."""
    split = urllib.parse.urlsplit(raw_uri)
    decoded = _decoded(split.path)
    if decoded is None or "\\" in decoded or "\x00" in decoded:
        return None
    if not posixpath.normpath(decoded).startswith("/v1/"):
        return None
    return f"{split.path}?{split.query}" if split.query else split.path


def force_model(body: bytes, model: str) -> bytes:
    """The body with its `model` field set, when it is a JSON object; otherwise unchanged."""
    if not body.lstrip()[:1] == b"{":
        return body
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # Not JSON after all, or nested too deep to parse: the backend will say what is wrong.
        return body
    if not isinstance(document, dict):
        return body
    document["model"] = model
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        # A lone surrogate (`"\\ud800"`) has no UTF-8 form: keep it escaped, as it came.
        return json.dumps(document, separators=(",", ":")).encode()


class _BodyStream:
    """A request body of known length, read from the client while it is sent to the backend, so
    a large upload is never held in memory. Nothing is read before the backend connection is
    open, so a backend that cannot be connected to leaves it whole for the next one."""

    __slots__ = ("_input", "_length", "_on_end")

    def __init__(self, wsgi_input, length: int, on_end):
        self._input = wsgi_input
        self._length = length
        self._on_end = on_end

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        data = self._input.read(size if size >= 0 else None)
        if not data:
            self._on_end()
        return data


# Bodies up to this size are read whole: cheap, and they can be sent again after the keep-alive
# race. Larger ones (uploads of audio, files, big batches) are streamed through.
STREAMED_BODY_BYTES = 1 << 20


def _nothing():
    pass


class Proxy:
    """The view for every method on every path under `/v1/`."""

    def __init__(self, settings, registry: Registry):
        self.registry = registry
        self.forced_model = settings.forced_model_name
        self.connect_timeout = settings.connect_timeout_seconds
        self.read_timeout = settings.read_timeout_seconds
        self.no_backend_wait = settings.no_backend_wait_seconds
        self.max_body = settings.max_request_body_bytes
        self.backend_authorization = access.backend_authorization(settings)

    def __call__(self, subpath: str = "") -> Response:
        environ = request.environ
        exchange = telemetry.Exchange(environ, subpath)
        target = upstream_target(environ.get("RAW_URI") or request.full_path)
        if target is None:
            return exchange.finished(
                error_response(400, "The request path must stay under /v1/."))
        client_socket = environ.get("gunicorn.socket")
        watch = ClientWatch(client_socket) if client_socket is not None else None
        try:
            body = self.request_body(environ, watch.start if watch else _nothing)
        except access.BodyRefused as refused:
            return exchange.finished(refused.response(environ))
        if not isinstance(body, _BodyStream) and watch:
            watch.start()
        headers = relay.request_headers(request.headers)
        headers[request_id.HEADER] = environ[request_id.ENVIRON_KEY]
        if self.backend_authorization:
            headers["Authorization"] = self.backend_authorization
        try:
            backend, response = self.send(request.method, target, headers, body, watch, exchange)
        except ClientGone:
            watch.stop()
            telemetry.client_disconnected()
            # nginx's "client closed request", for the access log
            return exchange.finished(Response(status=499))
        except _Failed as failed:
            if watch:
                watch.stop()
            return exchange.finished(failed.response)

        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        relayed = RelayedResponse(relay.relay_body(response, backend.url, sse, watch,
                                                   exchange.first_byte),
                                  status=response.status,
                                  headers=relay.response_headers(response.headers))
        # For HEAD, 204 and 304 Werkzeug never starts the generator, so its `finally` never runs.
        relayed.call_on_close(response.close)
        relayed.call_on_close(backend.release)
        if watch:
            relayed.call_on_close(watch.stop)
        return exchange.finished(relayed)

    def request_body(self, environ, on_end):
        """The body to send: streamed from the client when it is large, its length is known and it
        needs no rewrite (`on_end` is called once it has all been read); read whole otherwise.
        `BodyRefused` past MAX_REQUEST_BODY_BYTES or when it cannot be read to its end."""
        length = request.content_length
        access.check_declared_length(length, self.max_body)
        rewrite = self.forced_model and request.method == "POST"
        if length is not None and length > STREAMED_BODY_BYTES and not rewrite:
            return _BodyStream(environ["wsgi.input"], length, on_end)
        body = access.read_limited(environ["wsgi.input"], self.max_body, length)
        if rewrite and body:
            body = force_model(body, self.forced_model)
        return body or None

    def send(self, method, target, headers, body, watch, exchange):
        """Send to a healthy backend, trying others while connections cannot be opened and waiting
        up to NO_BACKEND_WAIT_SECONDS for one to come back; `_Failed` carries the error answer."""
        deadline = time.monotonic() + self.no_backend_wait
        tried = []
        stale_retried = False
        attempts = 0
        while True:
            backend = pick_backend(self.registry.healthy, tried)
            if backend is None:
                remaining = deadline - time.monotonic()
                with watch or contextlib.nullcontext():
                    came_back = remaining > 0 and self.registry.wait_for_healthy(remaining)
                if came_back:
                    tried = []  # a poll has seen them healthy since they failed
                    continue
                if tried:
                    raise _Failed(502, "No backend could be reached.")
                raise _Failed(503, "No healthy backend is available.")
            if attempts:
                telemetry.retried()
            attempts += 1
            exchange.sending_to(backend.url)
            backend.acquire()
            sent = False
            try:
                with watch or contextlib.nullcontext():
                    response = upstream.send(method, backend.url + target, headers, body,
                                             self.connect_timeout, self.read_timeout)
                sent = True
                return backend, response
            except upstream.ConnectFailed as exc:
                if exc.stale:
                    # Closed unanswered, the keep-alive race (upstream.StaleConnectionError): sent
                    # once more, anywhere; after that a backend that does it again is passed over
                    # (not marked down: it answers polls). A streamed body is gone, though.
                    if isinstance(body, _BodyStream):
                        raise _Failed(502, "The backend closed the connection without answering.")
                    if stale_retried:
                        tried.append(backend)
                    stale_retried = True
                    continue
                self.registry.mark_unreachable(backend, str(exc))
                tried.append(backend)
            except upstream.UpstreamTimeout:
                raise _Failed(504, f"The backend did not answer within {self.read_timeout:g} s.")
            except upstream.UpstreamFailed as exc:
                raise _Failed(502, f"The backend failed before answering: {exc}.")
            finally:
                if not sent:
                    backend.release()


class _Failed(Exception):
    """No backend answered; `response` is the error to give the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.response = error_response(status, message)
