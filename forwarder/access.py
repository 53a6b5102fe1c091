"""Who may call what: a client key on `/v1/*` (`FORWARDER_API_KEYS`, `API_KEYS_FILE`), the
`ADMIN_API_KEY` on the fleet's pages (`/_backends`, `/_status`, `/metrics`).

A Flask hook checks the key before any view runs, and only when keys are set. A refused request
never reaches a backend, and a body it carries is not read. The key that opened a `/v1/*`
request is handed to the view in the environ (`environ_keys.API_KEY`); what that key may use is
the view's to count (`tenants/limits.py`, through the request's ledger).
"""

import posixpath
import re

from flask import Flask, request

from . import environ_keys
from .errors import error_response
from .observe import metrics
from .relay.request_body import refuse_body
from .tenants.keys import KeyRing, Keys, digest

ADMIN_PATHS = frozenset(("/_backends", "/_status", "/_status/data", "/metrics"))
# The decoded path, however many slashes lead it: the proxy's route and its spellings.
_V1_PATH = re.compile(r"/*v1(/|$)")


def _is_admin_path(path: str) -> bool:
    return "/" + posixpath.normpath(path).strip("/") in ADMIN_PATHS


def install(app: Flask, settings, keys: Keys, registry) -> None:
    """Check keys before any view runs, when keys are set (otherwise no hook runs at all). A
    `/v1/*` request refused is counted like any other (`forwarder_requests_total`, status 401,
    backend `none`), so that a dashboard shows clients knocking with a wrong key."""
    admin_keys = KeyRing(((digest(settings.admin_api_key.encode()), True),)) \
        if settings.admin_api_key else None
    max_body = settings.max_request_body_bytes
    if not keys.required and admin_keys is None:
        return

    @app.before_request
    def require_key():
        path = request.path
        exchange = None
        if v1 := _V1_PATH.match(path):
            if not keys.required:
                return None
            keys.sync()
            opened = keys.ring.admits(request.headers.get("Authorization"))
            if opened is not None:
                request.environ[environ_keys.API_KEY] = opened
                return None
            exchange = metrics.Exchange(request.environ, path[v1.end():], registry)
        elif _is_admin_path(path):
            if admin_keys is None or admin_keys.admits(request.headers.get("Authorization")):
                return None
        else:
            return None
        response = error_response(401, "Missing or wrong API key: send it as "
                                       "`Authorization: Bearer <key>`.")
        response.headers["WWW-Authenticate"] = "Bearer"
        if request.content_length or "HTTP_TRANSFER_ENCODING" in request.environ:
            # The body of a stranger's upload is not read either.
            response = refuse_body(response, request.environ, max_body)
        return exchange.finished(response) if exchange is not None else response
