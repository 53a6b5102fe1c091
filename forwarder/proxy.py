"""The `/v1/*` proxy view: request in → pick a healthy backend → relay its answer.

Path, query string, body and headers go to the backend as the client sent them, except
hop-by-hop headers and, when `FORCED_MODEL_NAME` is set, the `model` field of a JSON-object POST
body. A backend that cannot be connected to is marked down and another is tried (nothing was sent
to it); once a request reached a backend it is not sent again, but for a connection closed
without a byte of answer (the keep-alive race: `upstream.StaleConnectionError`).

A body is never parsed unless something needs what it says: the `FORCED_MODEL_NAME` rewrite; the
`affinity` policy when no `X-Session-ID` header gives the session key; or model-aware routing when
the healthy backends do not all serve the same models (when they do, any of them answers vLLM's
own 404 for a model it lacks, so the `model` field changes nothing). Only then is a POST body read
whole, whatever its size, and parsed as JSON; multipart bodies (audio) never are.
`GET /v1/models` is answered from the fleet's merged lists, built once per poll.
"""

import contextlib
import json
import posixpath
import time
import urllib.parse

from flask import Response, request

from . import access, health, relay, request_id, telemetry, upstream
from .client_watch import ClientGone, ClientWatch, ShuttingDown
from .errors import error_response
from .registry import Registry
from .routing import SESSION_HEADER, Router, session_key


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
    if not split.path.startswith("/"):
        return None  # appended to the backend's base URL, it would change the host
    decoded = _decoded(split.path)
    if decoded is None or "\\" in decoded or "\x00" in decoded:
        return None
    if not posixpath.normpath(decoded).startswith("/v1/"):
        return None
    return f"{split.path}?{split.query}" if split.query else split.path


def json_object(body: bytes) -> "dict | None":
    """The body parsed, when it is a JSON object; None otherwise (the backend will say what is
    wrong with it)."""
    if not body.lstrip()[:1] == b"{":
        return None
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON after all, or nested too deep: the backend will say what is wrong
    return document if isinstance(document, dict) else None


def with_model(document: dict, model: str) -> bytes:
    """`document` with its `model` field set, encoded."""
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
        self.router = Router(settings.routing_policy, registry)
        self.forced_model = settings.forced_model_name
        self.connect_timeout = settings.connect_timeout_seconds
        self.read_timeout = settings.read_timeout_seconds
        self.no_backend_wait = settings.no_backend_wait_seconds
        self.first_poll_wait = health.first_cycle_wait(settings)
        self.max_body = settings.max_request_body_bytes
        self.backend_authorization = access.backend_authorization(settings)

    def __call__(self, subpath: str = "") -> Response:
        environ = request.environ
        exchange = telemetry.Exchange(environ, subpath)
        target = upstream_target(environ.get("RAW_URI") or request.full_path)
        if target is None:
            # Its body is never read: end the connection without losing the answer to a reset.
            return exchange.finished(access.refuse_body(
                error_response(400, "The request path must stay under /v1/."), environ,
                self.max_body))
        view = self.registry.view
        if request.method == "GET" and request.path == "/v1/models" and view.models_body:
            return exchange.finished(Response(view.models_body, mimetype="application/json"))
        session_header = request.headers.get(SESSION_HEADER)
        wants_document = (request.method == "POST" and request.mimetype != "multipart/form-data"
                          and (not view.uniform_models
                               or (self.router.needs_session_key and not session_header)))
        client_socket = environ.get("gunicorn.socket")
        watch = ClientWatch(client_socket) if client_socket is not None else None
        try:
            body, document = self.request_body(environ, wants_document,
                                               watch.start if watch else _nothing)
        except access.BodyRefused as refused:
            return exchange.finished(refused.response(environ))
        if not isinstance(body, _BodyStream) and watch:
            watch.start()
        model = document.get("model") if document else None
        route = (model if isinstance(model, str) else None,
                 session_key(session_header, document) if self.router.needs_session_key else None)
        headers = relay.request_headers(request.headers)
        headers[request_id.HEADER] = environ[request_id.ENVIRON_KEY]
        if self.backend_authorization:
            headers["Authorization"] = self.backend_authorization
        try:
            backend, response = self.send(request.method, target, headers, body, watch, exchange,
                                          route)
        except ClientGone:
            watch.stop()
            telemetry.client_disconnected()
            # nginx's "client closed request", for the access log
            return exchange.finished(Response(status=499))
        except ShuttingDown:
            watch.stop()
            return exchange.finished(error_response(503, relay.SHUTTING_DOWN))
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

    def request_body(self, environ, wants_document: bool, on_end):
        """(the body to send, the body's JSON object or None). The body is streamed from the
        client when it is large, its length is known and nothing needs to read it (`on_end` is
        called once it has all been read); it is read whole otherwise, and parsed when there is a
        `model` to force or routing `wants_document`. `BodyRefused` past MAX_REQUEST_BODY_BYTES
        or when it cannot be read to its end."""
        length = request.content_length
        access.check_declared_length(length, self.max_body)
        rewrite = self.forced_model and request.method == "POST"
        if (length is not None and length > STREAMED_BODY_BYTES and not rewrite
                and not wants_document):
            return _BodyStream(environ["wsgi.input"], length, on_end), None
        body = access.read_limited(environ["wsgi.input"], self.max_body, length)
        document = json_object(body) if body and (rewrite or wants_document) else None
        if rewrite and document is not None:
            body = with_model(document, self.forced_model)
        return body or None, document

    def send(self, method, target, headers, body, watch, exchange, route):
        """Send to a healthy backend serving the model, chosen by the routing policy (`route` is
        the model and the session key), trying others while connections cannot be opened and
        waiting up to NO_BACKEND_WAIT_SECONDS for one to come back; `_Failed` carries the error
        answer."""
        model, key = route
        deadline = time.monotonic() + self.no_backend_wait
        tried = []
        stale_retried = False
        attempts = 0
        while True:
            view = self.registry.view
            group = view.serving(model)
            if view.healthy and not group.members:
                raise _Failed(404, f"The model `{model}` does not exist.")
            backend = self.router.pick(group, key, tried)
            if backend is None:
                if not self.registry.first_cycle_done:
                    # A worker that has just started knows nothing yet: its first poll decides,
                    # rather than a blind 503 to the requests it accepted meanwhile.
                    with watch or contextlib.nullcontext():
                        self.registry.first_cycle.wait(self.first_poll_wait)
                    if self.registry.first_cycle_done:
                        continue
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
