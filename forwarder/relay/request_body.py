"""A request's body on its way to the backend: its limit, reading or streaming it, reading what it
says when something needs that, and refusing it without losing the answer.

- `MAX_REQUEST_BODY_BYTES`: a larger body gets `413`; a declared length over it is refused before
  a byte of the body is read, a chunked upload as soon as it passes it. A body that cannot be
  read to its end (broken chunked encoding, a client gone mid-body) gets `400`.
- A body over STREAMED_BODY_BYTES with a known length that nothing needs to read is streamed to
  the backend as it arrives, never held whole; any other is read whole (and can then be sent
  again after the keep-alive race).
- A body is parsed as JSON only when asked to (the `FORCED_MODEL_NAME` rewrite, routing that
  needs its `model` or session key).
- An answer after which the forwarder will not read the rest of a body (`refuse_body`) ends its
  connection: it says `Connection: close`, and the forwarder discards what the client still sends
  for a moment instead of resetting the connection over the answer (`linger`).
"""

import socket
import time

from ..environ_keys import CLOSE_CONNECTION
from ..errors import error_response
from .json_bodies import encoded, json_object

# Chunked request bodies are read in pieces of this size, so the limit is noticed in time.
READ_SIZE = 65536
# Bodies up to this size are read whole: cheap, and they can be sent again after the keep-alive
# race. Larger ones (uploads of audio, files, big batches) are streamed through.
STREAMED_BODY_BYTES = 1 << 20
# After a refused body (`413`, `401`, `400`): how long, and (at most the body limit) how much,
# of what the client still sends is discarded before the connection closes.
LINGER_SECONDS = 2.0


class BodyRefused(Exception):
    """The request body is not sent on; `response(environ)` is the answer for the client."""

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


class BodyStream:
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


def take(environ, length: "int | None", limit: int, parse: bool, forced_model: "str | None",
         on_end, ask_usage: bool = False) -> "tuple[bytes | BodyStream | None, dict | None, bool]":
    """(the body to send, the body's JSON object or None, whether the forwarder asked for its
    usage). The body is streamed from the client when it is large, its length is known and
    nothing needs to read it (`on_end` is called once it has all been read); it is read whole
    otherwise, and parsed when `parse`, when there is a `forced_model` to set in it, or, with
    `ask_usage`, when it may be a stream (`ask_for_usage`). `BodyRefused` past `limit` or
    when it cannot be read to its end."""
    if length is not None and length > limit:
        raise BodyTooLarge(limit)
    parse = parse or forced_model is not None
    if length is not None and length > STREAMED_BODY_BYTES and not parse:
        return BodyStream(environ["wsgi.input"], length, on_end), None, False
    body = read_limited(environ["wsgi.input"], limit, length)
    ask_usage = ask_usage and b'"stream"' in body
    document = json_object(body) if body and (parse or ask_usage) else None
    asked = ask_for_usage(document, body) if ask_usage and document is not None else None
    if document is not None and forced_model is not None:
        body = encoded(document, forced_model)
    elif asked is not None:
        body = asked
    return body or None, document, asked is not None


_ASK = b'"stream_options":{"include_usage":true},'


def ask_for_usage(document: dict, body: bytes) -> "bytes | None":
    """Make a streamed chat or completions request (its `document`, parsed from `body`, a JSON
    object) ask for its usage: the body to send instead, or None when it needs no change. A body
    without `stream_options` keeps every byte it had, the option written in after its `{`;
    only one whose options lack `include_usage` is written anew. `document` gains the option
    too, so that a later rewrite of it (`FORCED_MODEL_NAME`) keeps it."""
    if document.get("stream") is not True:
        return None
    options = document.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return None
    if options is not None and not isinstance(options, dict):
        return None  # not vLLM's shape: the backend will say what is wrong
    document["stream_options"] = {**(options or {}), "include_usage": True}
    if options is not None:
        return encoded(document)
    start = body.index(b"{") + 1
    return body[:start] + _ASK + body[start:]


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

    The answer says `Connection: close`, so a client that keeps its connections alive sends its
    next request on a new one. Once the answer is written the forwarder stops sending and
    discards what the client still sends for a moment (up to `linger_bytes`, as nginx's lingering
    close does): closing a socket with unread data sends a reset, which can destroy an answer
    still on its way, and a client that writes its whole body before reading, as most do, would
    see only the reset. Then gunicorn closes the connection instead of reading all of the rest of
    the body, however long, to reach the next request."""
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
