"""Who may use the forwarder: the API keys.

- `FORWARDER_API_KEYS`: every `/v1/*` request needs `Authorization: Bearer <one of them>`.
- `ADMIN_API_KEY`: `/_backends`, `/_status` and `/metrics` need `Authorization: Bearer <it>`.
- `BACKEND_API_KEY`: the `Authorization` sent to backends in place of the client's.

A refused request never reaches a backend, and a body it carries is not read. Keys are compared
as SHA-256 digests with `hmac.compare_digest`, against every key whatever the earlier ones gave,
so the time an answer takes tells neither which key matched nor how much of a guess was right,
nor a key's length.
"""

import hashlib
import hmac
import posixpath
import re

from flask import Flask, request

from .errors import error_response
from .request_body import refuse_body

ADMIN_PATHS = frozenset(("/_backends", "/_status", "/metrics"))
# The decoded path, however many slashes lead it: the proxy's route and its spellings.
_V1_PATH = re.compile(r"/*v1(/|$)")


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class KeyRing:
    """The Bearer tokens that open one part of the forwarder."""

    __slots__ = ("_digests",)

    def __init__(self, keys):
        self._digests = tuple(_digest(key.encode()) for key in keys)

    def admits(self, authorization: "str | None") -> bool:
        """Whether an `Authorization` header value carries one of the keys."""
        scheme, _, token = (authorization or "").partition(" ")
        # WSGI hands header values over as latin-1 text; back to the bytes the client sent.
        presented = _digest(token.strip().encode("latin-1", "replace"))
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched and scheme.lower() == "bearer"


def _is_admin_path(path: str) -> bool:
    return "/" + posixpath.normpath(path).strip("/") in ADMIN_PATHS


def install(app: Flask, settings) -> None:
    """Check keys before any view runs, when keys are set (otherwise no hook runs at all)."""
    client_keys = KeyRing(settings.forwarder_api_keys) if settings.forwarder_api_keys else None
    admin_keys = KeyRing((settings.admin_api_key,)) if settings.admin_api_key else None
    max_body = settings.max_request_body_bytes
    if client_keys is None and admin_keys is None:
        return

    @app.before_request
    def require_key():
        path = request.path
        if _V1_PATH.match(path):
            keys = client_keys
        elif _is_admin_path(path):
            keys = admin_keys
        else:
            return None
        if keys is None or keys.admits(request.headers.get("Authorization")):
            return None
        response = error_response(401, "Missing or wrong API key: send it as "
                                       "`Authorization: Bearer <key>`.")
        response.headers["WWW-Authenticate"] = "Bearer"
        if request.content_length or "HTTP_TRANSFER_ENCODING" in request.environ:
            # The body of a stranger's upload is not read either.
            return refuse_body(response, request.environ, max_body)
        return response


def backend_authorization(settings) -> "str | None":
    """The `Authorization` value to send to backends instead of the client's, if any."""
    return f"Bearer {settings.backend_api_key}" if settings.backend_api_key else None
