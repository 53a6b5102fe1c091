"""The `/v1/*` proxy view, orchestration only: request in → its key's place → its body → a
backend (`dispatch.py`) → relay its answer (`response_body.py`), going on elsewhere should its
backend break off (`resume.py`); every place the request takes is its ledger's (`ledger.py`).

Path, query string, body and headers go to the backend as the client sent them, except
hop-by-hop headers and, when `FORCED_MODEL_NAME` is set, the `model` field of a JSON-object POST
body. A body is never parsed unless something needs what it says: the `FORCED_MODEL_NAME`
rewrite; the `affinity` policy when no `X-Session-ID` header gives the session key; or
model-aware routing when the healthy backends do not all serve the same models (when they do,
any of them answers vLLM's own 404 for a model it lacks, so the `model` field changes nothing).
Multipart bodies (audio) never are. `GET /v1/models` is answered from the fleet's merged lists,
built once per change.
"""

import logging
import posixpath
import urllib.parse

from flask import Response, request

from .. import environ_keys
from ..errors import Rejected, error_response
from ..fleet.ejection import Ejection
from ..fleet.load import weight_of
from ..fleet.registry import Registry
from ..observe import metrics
from ..observe.request_id import HEADER as REQUEST_ID_HEADER
from ..tenants import usage
from ..tenants.keys import Keys
from ..tenants.limits import KeyLimits
from .. import upstream
from . import headers as relay_headers, request_body
from .brake import Brake
from .client_watch import ClientGone, ClientWatch, ShuttingDown
from .dispatch import Dispatcher, DispatchFailed, Outgoing
from .json_bodies import json_object
from .ledger import Ledger
from .policies import make_policy
from .policies.affinity import SESSION_HEADER, session_key
from .response_body import SHUTTING_DOWN, RelayedBody
from .resume import ASKED_AGAIN, CONTINUED_STREAMS, Resumer

log = logging.getLogger(__name__)

# A whole answer up to this long is read before the client gets a byte of it, so that it can
# be asked again should its backend break it off.
WHOLE_ANSWER_BYTES = 16 << 20


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


def _nothing():
    pass


class Proxy:
    """The view for every method on every path under `/v1/`."""

    def __init__(self, settings, registry: Registry, keys: Keys):
        self.registry = registry
        self.keys = keys
        self.meter = settings.meter_tokens
        self.keep_alive = settings.sse_keepalive_seconds
        self.weight_bytes = settings.request_weight_bytes
        self.policy = make_policy(settings.routing_policy, registry)
        self.brake = Brake(settings, registry.table) \
            if settings.max_in_flight_per_backend else None
        self.limits = KeyLimits(registry.table)
        ejection = Ejection(registry, settings.eject_after_failures, settings.eject_seconds)
        self.dispatcher = Dispatcher(registry, self.policy, settings, ejection, self.brake)
        self.forced_model = settings.forced_model_name
        self.connect_timeout = settings.connect_timeout_seconds
        self.read_timeout = settings.read_timeout_seconds
        self.max_body = settings.max_request_body_bytes
        self.backend_authorization = relay_headers.backend_authorization(settings)
        self.resume = settings.resume_streams and settings.max_resumes > 0
        self.max_resumes = settings.max_resumes

    def __call__(self, subpath: str = "") -> Response:
        environ = request.environ
        exchange = metrics.Exchange(environ, subpath, self.registry)
        ledger = Ledger(self.limits, self.brake)
        try:
            response = exchange.finished(self._answer(environ, exchange, ledger))
            # The last step: from here on the relayed body, if any, gives the places back.
            ledger.handed_over = isinstance(response.response, RelayedBody)
            return response
        finally:
            if not ledger.handed_over:
                ledger.close()

    def _answer(self, environ, exchange, ledger: Ledger) -> Response:
        target = upstream_target(environ.get("RAW_URI") or request.full_path)
        if target is None:
            # Its body is never read: end the connection without losing the answer to a reset.
            return request_body.refuse_body(
                error_response(400, "The request path must stay under /v1/."), environ,
                self.max_body)
        method = request.method
        view = self.registry.view
        if method == "GET" and request.path == "/v1/models" and view.models_body:
            return Response(view.models_body, mimetype="application/json")
        api_key = environ.get(environ_keys.API_KEY)
        if api_key is not None:
            exchange.key = api_key
            try:
                ledger.take_key(api_key)
            except Rejected as rejected:
                return request_body.refuse_body(rejected.response(), environ, self.max_body)
        session_header = request.headers.get(SESSION_HEADER)
        needs_session_key = self.policy.needs_session_key
        post = method == "POST"
        wants_document = (post and request.mimetype != "multipart/form-data"
                          and (not view.uniform_models
                               or (needs_session_key and not session_header)))
        metered_stream = self.meter and post and exchange.endpoint in usage.ASKED_STREAMS
        client_socket = environ.get("gunicorn.socket")
        watch = ClientWatch(client_socket) if client_socket is not None else None
        try:
            return self._send(environ, exchange, ledger, target, method, post, wants_document,
                              metered_stream, session_header, watch)
        except BaseException:
            if watch is not None:
                watch.stop()
            raise

    def _send(self, environ, exchange, ledger, target, method, post, wants_document,
              metered_stream, session_header, watch) -> Response:
        try:
            body, document, asked = request_body.take(
                environ, request.content_length, self.max_body, wants_document,
                self.forced_model if post else None,
                watch.start if watch else _nothing, ask_usage=metered_stream)
        except request_body.BodyRefused as refused:
            return refused.response(environ)
        streamed = isinstance(body, request_body.BodyStream)
        if watch and not streamed:
            watch.start()
        model = document.get("model") if document else None
        model = model if isinstance(model, str) else None
        exchange.named(model)
        headers = relay_headers.request_headers(request.headers)
        headers[REQUEST_ID_HEADER] = environ[environ_keys.REQUEST_ID]
        if self.backend_authorization:
            headers["Authorization"] = self.backend_authorization

        endpoint = exchange.endpoint
        asked_again = self.resume and not streamed and endpoint in ASKED_AGAIN

        def send(backend, sent_body):
            return upstream.send(method, backend.url + target, headers, sent_body,
                                 self.connect_timeout, self.read_timeout)

        def attempt(backend):
            response = send(backend, body)
            if asked_again and not response.headers.get(
                    "content-type", "").startswith("text/event-stream"):
                # Read whole before the client gets a byte: a backend that breaks it off is
                # asked again elsewhere.
                return upstream.read_whole(response, WHOLE_ANSWER_BYTES)
            return response

        def ask_again(backend, reason):
            metrics.resumed("resumed")
            exchange.resumed()
            log.warning("request_id=%s: the backend %s broke off (%s) before the client got a "
                        "byte; asking another", exchange.request_id, backend.url, reason)

        def priority_of():
            parsed = document if document is not None or streamed or not body \
                else json_object(body)
            priority = parsed.get("priority") if parsed else None
            return priority if type(priority) is int else 0

        api_key = exchange.key
        outgoing = Outgoing(
            attempt, model,
            session_key(session_header, document) if self.policy.needs_session_key else None,
            weight_of(len(body) if body else 0, self.weight_bytes),
            resendable=not streamed, waiting=watch, on_attempt=exchange.sending_to,
            priority_of=priority_of,
            client=api_key.name if api_key is not None and api_key.name
            else environ.get("REMOTE_ADDR", ""),
            asks_again=self.max_resumes if asked_again else 0, on_ask_again=ask_again)
        try:
            backend, response = self.dispatcher.send(outgoing, ledger)
        except ClientGone:
            metrics.client_disconnected()
            # nginx's "client closed request", for the access log
            return Response(status=499)
        except ShuttingDown:
            environ[environ_keys.CLOSE_CONNECTION] = True
            return error_response(503, SHUTTING_DOWN)
        except (DispatchFailed, Rejected) as failed:
            return failed.response()
        finally:
            if watch is not None and ledger.backend is None:
                watch.stop()

        try:
            ledger.failed = response.status >= 500
            content_type = response.headers.get("content-type", "")
            sse = content_type.startswith("text/event-stream")
            tap = None
            if self.meter and post:
                if sse and exchange.endpoint in usage.METERED_STREAMS:
                    tap = usage.StreamTap(hide=asked, read_model=model is None)
                elif content_type.startswith("application/json"):
                    tap = usage.JsonTap()
            exchange.usage = tap
            exchange.token_stream = sse and exchange.endpoint in usage.ASKED_STREAMS
            resumer = Resumer(self.dispatcher, outgoing, send, ledger, exchange, endpoint, body,
                              document, backend) \
                if sse and asked_again and endpoint in CONTINUED_STREAMS else None
            return RelayedResponse(
                RelayedBody(response, exchange, ledger, sse, watch, tap, self.keep_alive,
                            resumer),
                status=response.status,
                headers=relay_headers.response_headers(response.headers))
        except BaseException:
            response.close()
            raise
