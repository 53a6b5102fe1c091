"""Who may use the forwarder and how much they may send: API keys and the request body limit.

- `FORWARDER_API_KEYS`: every `/v1/*` request needs `Authorization: Bearer <one of them>`.
- `ADMIN_API_KEY`: `/_backends`, `/_status` and `/metrics` need `Authorization: Bearer <it>`.
- `BACKEND_API_KEY`: the `Authorization` sent to backends in place of the client's.
- `MAX_REQUEST_BODY_BYTES`: a larger body gets `413`; a declared length over it is refused
  before a byte of the body is read, a chunked upload as soon as it passes it. A body that
  cannot be read to its end (broken chunked encoding, a client gone mid-body) gets `400`.

A refused request never reaches a backend. Keys are compared as SHA-256 digests with
`hmac.compare_digest`, against every key whatever the earlier ones gave, so the time an answer
takes tells neither which key matched nor how much of a guess was right, nor a key's length.
"""

import hashlib
import hmac
import posixpath
import re
import socket
import time

from flask import Flask, request

from .errors import error_response

ADMIN_PATHS = frozenset(("/_backends", "/_status", "/metrics"))
# The decoded path, however many slashes lead it: the proxy's route and its spellings.
_V1_PATH = re.compile(r"/*v1(/|$)")
# Chunked request bodies are read in pieces of this size, so the limit is noticed in time.
READ_SIZE = 65536
# After a refused body (`413`, `401`, `400`): how long, and (at most the body limit) how much,
# of what the client still sends is discarded before the connection closes.
LINGER_SECONDS = 2.0
# The WSGI environ key that tells `post_request` in `gunicorn.conf.py` to end the connection.
CLOSE_CONNECTION = "forwarder.close_connection"


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


class BodyRefused(Exception):
    """The request body is not sent on; `response` is the answer for the client."""

    status = 400

    def __init__(self, message: str, limit: int):
        super().__init__(message)
        self.limit = limit

    def response(self, environ):
        return refuse_body(error_response(self.status, str(self)), environ, self.limit)


class BodyTooLarge(BodyRefused):
    """The request body is longer than MAX_REQUEST_BODY_BYTES."""

    status = 413

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than the limit of {limit} bytes "
                         f"(MAX_REQUEST_BODY_BYTES).", limit)


def check_declared_length(length: "int | None", limit: int) -> None:
    """Refuse a body by its `Content-Length` alone, before anything of it is read."""
    if length is not None and length > limit:
        raise BodyTooLarge(limit)


def read_limited(stream, limit: int, length: "int | None") -> bytes:
    """The whole body, refused as soon as it passes `limit`, or when it cannot be read to its end
    (broken chunked encoding, a client gone before the `length` it declared)."""
    pieces = []
    size = 0
    while True:
        try:
            piece = stream.read(READ_SIZE)
        except Exception as exc:
            # The WSGI server raises its own parse errors here (gunicorn: NoMoreData,
            # InvalidChunkSize, ChunkMissingTerminator ...): all mean the body is unusable.
            raise BodyRefused(f"The request body could not be read: "
                              f"{type(exc).__name__}.", limit) from None
        if not piece:
            if length is not None and size < length:
                raise BodyRefused(f"The request body ended after {size} of the {length} bytes "
                                  f"its Content-Length declared.", limit)
            return b"".join(pieces)
        size += len(piece)
        if size > limit:
            raise BodyTooLarge(limit)
        pieces.append(piece)


def refuse_body(response, environ, linger_bytes: int):
    """`response`, after which the connection ends instead of its request body being read.

    Once the answer is written the forwarder stops sending and discards what the client still
    sends for a moment (up to `linger_bytes`, as nginx's lingering close does): closing a socket
    with unread data sends a reset, which can destroy an answer still on its way, and a client
    that writes its whole body before reading, as most do, would see only the reset. Then
    `post_request` in `gunicorn.conf.py` closes the connection (gunicorn would otherwise read
    all of the rest of the body, however long, to reach the next request)."""
    environ[CLOSE_CONNECTION] = True
    client_socket = environ.get("gunicorn.socket")
    if client_socket is not None:
        response.call_on_close(lambda: linger(client_socket, linger_bytes))
    return response


def linger(client_socket, max_bytes: int) -> None:
    """Stop sending on `client_socket` and discard what the client still sends, for up to
    LINGER_SECONDS and `max_bytes`, so that closing it next sends no reset over an answer."""
    deadline = time.monotonic() + LINGER_SECONDS
    discarded = 0
    try:
        client_socket.shutdown(socket.SHUT_WR)
        while discarded < max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            client_socket.settimeout(remaining)
            piece = client_socket.recv(READ_SIZE)
            if not piece:
                return
            discarded += len(piece)
    except OSError:
        pass
