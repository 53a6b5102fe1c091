"""The `/v1/*` proxy view: request in → pick a healthy backend → relay its answer.

Path, query string, body and headers go to the backend as the client sent them, except
hop-by-hop headers and, when `FORCED_MODEL_NAME` is set, the `model` field of a JSON-object POST
body. A backend that cannot be connected to is marked down and another is tried (nothing was sent
to it); once a request reached a backend it is never sent again.
"""

import json
import posixpath
import urllib.parse

from flask import Response, request

from . import relay, upstream
from .errors import error_response
from .registry import Registry
from .routing import pick_backend


class RelayedResponse(Response):
    # A backend response without a Content-Type must not gain Flask's `text/html` default.
    default_mimetype = None


def upstream_target(raw_uri: str) -> "str | None":
    """The path and query to request from the backend: the client's own bytes, or None when the
    path would leave `/v1/` once decoded and normalised (the backend must see nothing else)."""
    split = urllib.parse.urlsplit(raw_uri)
    decoded = urllib.parse.unquote(split.path)
    if "\\" in decoded or "\x00" in decoded:
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
    except ValueError:
        return body  # not JSON after all: the backend will say what is wrong with it
    if not isinstance(document, dict):
        return body
    document["model"] = model
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


class Proxy:
    """The view for every method on every path under `/v1/`."""

    def __init__(self, settings, registry: Registry):
        self.registry = registry
        self.forced_model = settings.forced_model_name
        self.connect_timeout = settings.connect_timeout_seconds
        self.read_timeout = settings.read_timeout_seconds

    def __call__(self, subpath: str = "") -> Response:
        environ = request.environ
        target = upstream_target(environ.get("RAW_URI") or request.full_path)
        if target is None:
            return error_response(400, "The request path must stay under /v1/.")
        body = environ["wsgi.input"].read()
        if self.forced_model and request.method == "POST" and body:
            body = force_model(body, self.forced_model)
        headers = relay.request_headers(request.headers)

        tried = []
        while True:
            backend = pick_backend(self.registry.healthy, tried)
            if backend is None:
                if tried:
                    return error_response(502, "No backend could be reached.")
                return error_response(503, "No healthy backend is available.")
            try:
                response = upstream.send(request.method, backend.url + target, headers,
                                         body or None, self.connect_timeout, self.read_timeout)
                break
            except upstream.ConnectFailed as exc:
                self.registry.mark_unreachable(backend, str(exc))
                tried.append(backend)
            except upstream.UpstreamTimeout:
                return error_response(504, f"The backend did not answer within "
                                           f"{self.read_timeout:g} s.")
            except upstream.UpstreamFailed as exc:
                return error_response(502, f"The backend failed before answering: {exc}.")

        sse = response.headers.get("content-type", "").startswith("text/event-stream")
        body_iter = relay.relay_body(response, backend.url, sse, environ.get("gunicorn.socket"))
        relayed = RelayedResponse(body_iter, status=response.status_code,
                                  headers=relay.response_headers(response.raw.headers))
        # For HEAD, 204 and 304 Werkzeug never starts the generator, so its `finally` never runs.
        relayed.call_on_close(response.close)
        return relayed
