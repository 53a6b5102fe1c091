"""End-to-end: API keys, the body limit, request limits and isolation between clients, through
one real gunicorn (shared by the tests of this module) in front of one fake vLLM.

Every refusal is checked on both sides: the client's answer, and a backend that saw nothing.
"""

import json
import socket
import threading

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import backend_behind_forwarder, wait_until

CLIENT_KEYS = ("sk-first", "sk-second")
ADMIN_KEY = "admin-secret"
BACKEND_KEY = "backend-secret"
LIMIT = 1_000_000
COOKIES = ["session=abc; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/", "route=gpu7; HttpOnly"]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy")


class FakeProxy:
    """A listener on loopback that counts the connections anyone opens to it."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self):
        self._listener.close()


@pytest.fixture(scope="module")
def fake_proxy():
    proxy = FakeProxy()
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fake_proxy):
    """(backend, forwarder): keys, a 1 MB body limit, and every proxy variable pointing at the
    fake proxy."""
    env = {"FORWARDER_API_KEYS": ",".join(CLIENT_KEYS), "ADMIN_API_KEY": ADMIN_KEY,
           "BACKEND_API_KEY": BACKEND_KEY, "MAX_REQUEST_BODY_BYTES": str(LIMIT),
           "NO_PROXY": None, "no_proxy": None}
    env.update({name: fake_proxy.url for name in PROXY_VARIABLES})
    with backend_behind_forwarder(tmp_path_factory, {"set_cookies": COOKIES}, env) as pair:
        yield pair


@pytest.fixture
def backend(setup):
    setup[0].reset()
    return setup[0]


@pytest.fixture
def fwd(setup):
    return setup[1]


def session():
    http = requests.Session()
    http.trust_env = False
    return http


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def exchange(port, request: bytes, timeout=5) -> bytes:
    """Send raw bytes and read until the server closes the connection, which it must do within
    `timeout` seconds; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except socket.timeout:
            raise AssertionError(f"connection still open after {timeout} s: {answer[:300]!r}")
    return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def json_body(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status and error["type"] and error["message"]


# --- FORWARDER_API_KEYS, BACKEND_API_KEY -----------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    bearer("sk-wrong"),
    bearer("sk-first-and-more"),  # a key's prefix or extension is not the key
    bearer("sk-firs"),
    bearer(""),
    bearer(ADMIN_KEY),  # the admin key does not open the API
    {"Authorization": "sk-first"},  # no scheme
    {"Authorization": "Basic sk-first"},
    {"Authorization": "Bearer sk-first, Bearer sk-second"},
], ids=["none", "wrong", "longer", "shorter", "empty", "admin", "no-scheme", "basic", "two"])
def test_v1_without_a_right_key_is_401_and_reaches_no_backend(backend, fwd, headers):
    with session() as http:
        response = http.post(fwd.url + "/v1/chat/completions", headers=headers,
                             json={"model": "llama", "messages": []})
    assert_openai_error(response, 401)
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert backend.requests() == []


def test_a_refused_v1_request_is_counted_with_its_401(backend, fwd):
    def refused():
        text = requests.get(fwd.url + "/metrics", headers=bearer(ADMIN_KEY), timeout=5).text
        return sum(s.value for family in text_string_to_metric_families(text)
                   for s in family.samples if s.name == "forwarder_requests_total"
                   and s.labels == {"backend": "none", "endpoint": "embeddings",
                                    "status": "401"})

    before = refused()
    with session() as http:
        for headers in ({}, bearer("sk-wrong")):
            assert http.post(fwd.url + "/v1/embeddings", headers=headers,
                             json={"input": "x"}).status_code == 401
    wait_until(lambda: refused() == before + 2, message=lambda: f"counted {refused() - before}")


@pytest.mark.parametrize("path", ["/v1/models", "//v1/models", "/%76%31/models", "/v1",
                                  "/v1/../_backends"])
def test_every_spelling_of_v1_needs_a_key(backend, fwd, path):
    answer = exchange(fwd.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                      .encode())
    assert status_of(answer) in (401, 404), answer
    assert backend.requests() == []


def test_openai_sdk_with_a_wrong_key_gets_authentication_error(backend, fwd):
    client = openai.OpenAI(base_url=fwd.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}])
    assert backend.requests() == []


def test_each_key_works_and_the_backend_gets_backend_api_key(backend, fwd):
    for key in CLIENT_KEYS:
        client = openai.OpenAI(base_url=fwd.url + "/v1", api_key=key, max_retries=0)
        reply = client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    seen = backend.requests()
    assert len(seen) == 2
    for request in seen:
        assert request["headers"]["authorization"] == [f"Bearer {BACKEND_KEY}"]


def test_a_body_sent_with_a_wrong_key_is_not_read(backend, fwd):
    # The declared body is never sent: only a server that does not wait for it answers.
    answer = exchange(fwd.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                b"Authorization: Bearer sk-wrong\r\nContent-Length: 1000\r\n\r\n")
    assert status_of(answer) == 401
    assert backend.requests() == []


# --- ADMIN_API_KEY ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/_backends", "/_status", "/metrics", "/_backends/",
                                  "//_backends", "/%5fbackends", "/./metrics"])
@pytest.mark.parametrize("key", [None, "wrong", CLIENT_KEYS[0]])
def test_admin_pages_need_the_admin_key(fwd, path, key):
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    answer = exchange(fwd.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n"
                                f"\r\n".encode())
    assert status_of(answer) == 401, answer
    assert json_body(answer)["error"]["code"] == 401
    assert b"127.0.0.1" not in answer.split(b"\r\n\r\n", 1)[1]


def test_admin_key_opens_the_admin_pages(fwd):
    with session() as http:
        pages = {path: http.get(fwd.url + path, headers=bearer(ADMIN_KEY))
                 for path in ("/_backends", "/_status", "/metrics")}
    assert {path: r.status_code for path, r in pages.items()} == dict.fromkeys(pages, 200)
    assert pages["/_backends"].json()["healthy"] == 1
    assert b"forwarder_" in pages["/metrics"].content


# --- MAX_REQUEST_BODY_BYTES ------------------------------------------------------------------

def test_declared_length_over_the_limit_is_refused_before_any_of_it_is_read(backend, fwd):
    with socket.create_connection(("127.0.0.1", fwd.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer sk-first\r\nContent-Length: 1000000000000\r\n\r\n")
        # Not one byte of the declared terabyte was sent: the answer can only come from the
        # header, and the connection ends after it.
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert status_of(answer) == 413
        assert json_body(answer)["error"]["type"] == "RequestTooLargeError"
        # What the client sends now is no longer read (gunicorn would otherwise read and
        # discard the whole terabyte): the connection is closed, so sending soon fails.
        with pytest.raises(OSError):
            for _ in range(64 * 1024):
                sock.sendall(b"x" * 1024)
    assert backend.requests() == []


def test_chunked_upload_is_refused_once_it_passes_the_limit(backend, fwd):
    # One byte over the limit, then silence: a forwarder that waited for the end of the body
    # would never answer.
    piece = b"x" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer sk-first\r\nTransfer-Encoding: chunked\r\n\r\n")
        while sent <= LIMIT:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        answer = sock.recv(65536)
        while chunk := sock.recv(65536):
            answer += chunk
    assert status_of(answer) == 413
    assert json_body(answer)["error"]["code"] == 413
    assert backend.requests() == []


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_client_that_sends_its_whole_large_body_sees_413(backend, fwd, chunked):
    body = b"x" * (3 * LIMIT)
    data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    with session() as http:
        response = http.post(fwd.url + "/v1/completions", data=data, headers=bearer("sk-first"))
    assert_openai_error(response, 413)
    assert backend.requests() == []


def test_every_refusal_that_ends_its_connection_says_so_and_reaches_a_kept_alive_client(
        backend, fwd):
    # One session, as every SDK keeps one: each refusal must reach it, whatever came before on
    # its connection, and must tell it that the connection ends, so that its next request goes
    # on a new one instead of into a closed socket.
    over = b"x" * (LIMIT + 1)
    with session() as http:
        for _ in range(5):
            for data, headers, path, status in (
                    (over, bearer("sk-first"), "/v1/completions", 413),
                    (over + over, bearer("sk-first"), "/v1/completions", 413),
                    (b"{}", bearer("sk-wrong"), "/v1/completions", 401),
                    (b"{}", bearer("sk-first"), "/v1/%2e%2e/metrics", 400),
                    (b"{}", bearer("sk-first"), "/v1/models/llama", 200)):
                response = http.post(fwd.url + path, data=data, headers=headers)
                assert response.status_code == status, response.text
                if status != 200:
                    assert response.headers["Connection"] == "close"
    assert all(r["body_length"] == 2 for r in backend.requests())


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
def test_a_body_of_exactly_the_limit_passes_whole(backend, fwd, chunked):
    body = bytes(range(256)) * (LIMIT // 256) + b"z" * (LIMIT % 256)
    data = iter([body[i:i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    with session() as http:
        response = http.put(fwd.url + "/v1/files/x", data=data, headers=bearer("sk-first"))
    assert response.status_code == 200
    (seen,) = backend.requests()
    assert seen["body_length"] == LIMIT


# --- isolation between clients ---------------------------------------------------------------

def test_set_cookie_reaches_only_its_client_and_is_never_replayed(backend, fwd):
    with session() as first:
        response = first.get(fwd.url + "/v1/models/llama", headers=bearer("sk-first"))
    assert response.raw.headers.getlist("Set-Cookie") == COOKIES
    for _ in range(2):  # other clients, each with an empty cookie jar of its own
        with session() as other:
            other.get(fwd.url + "/v1/models/llama", headers=bearer("sk-second"))
    seen = backend.requests()
    assert len(seen) == 3
    assert [r for r in seen if "cookie" in r["headers"]] == []


def test_proxy_variables_never_reroute_backend_traffic(backend, fwd, fake_proxy):
    # The fixture's forwarder has every proxy variable pointing at `fake_proxy`, has polled
    # the backend, and the request below goes through it; the proxy never saw a connection.
    with session() as http:
        response = http.post(fwd.url + "/v1/completions", headers=bearer("sk-first"),
                             json={"model": "llama", "prompt": "hi"})
    assert response.status_code == 200
    assert len(backend.requests()) == 1
    assert fake_proxy.connections == 0


# --- gunicorn's request limits (gunicorn.conf.py) --------------------------------------------

@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /v1/" + b"a" * 8190 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8190 + b"\r\n\r\n", 431),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(101))
     + b"\r\n", 431),
], ids=["request-line", "header-size", "header-count"])
def test_request_line_and_header_limits(backend, fwd, request_bytes, status):
    answer = exchange(fwd.port, request_bytes)
    assert status_of(answer) == status, answer[:200]
    assert backend.requests() == []


def test_a_request_gunicorn_cannot_parse_gets_its_400_even_with_a_body_behind_it(backend, fwd):
    # gunicorn refuses the request line and closes with the body unread: without the linger
    # (forwarder/gunicorn_worker.py) the reset that sends destroyed the 400 most times.
    body = b"x" * 256 * 1024
    request = (b"POST /v1/completions HTTP/2.0\r\nHost: x\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    for _ in range(5):
        answer = exchange(fwd.port, request)
        assert status_of(answer) == 400, answer[:200]
    assert backend.requests() == []


def test_request_line_and_headers_within_the_limits_pass(backend, fwd):
    path = "/v1/models/llama?q=" + "a" * 8000
    headers = {**bearer("sk-first"), "X-Big": "b" * 8000,
               **{f"X-H{i}": "1" for i in range(90)}}
    with session() as http:
        response = http.get(fwd.url + path, headers=headers)
    assert response.status_code == 200
    assert backend.requests()[0]["path"] == path


# --- path safety -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/%252e%252e/metrics", "/v1/..%255cmetrics",
                                  "/v1/%25252e%25252e/x", "/v1/a/..%2f..%2f_fake/config"])
def test_paths_that_leave_v1_when_decoded_again_are_400(backend, fwd, path):
    answer = exchange(fwd.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                f"sk-first\r\nConnection: close\r\n\r\n".encode())
    assert status_of(answer) == 400, answer
    assert json_body(answer)["error"]["code"] == 400
    assert backend.requests() == []


# --- bodies that cannot be read --------------------------------------------------------------

def test_broken_chunked_encoding_is_400_and_reaches_no_backend(backend, fwd):
    answer = exchange(fwd.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                b"Authorization: Bearer sk-first\r\nTransfer-Encoding: chunked\r\n"
                                b"\r\nzz\r\nabc\r\n0\r\n\r\n")
    assert status_of(answer) == 400
    assert "could not be read" in json_body(answer)["error"]["message"]
    assert backend.requests() == []


def test_a_client_that_stops_before_its_content_length_leaves_no_backend_waiting(backend, fwd):
    with socket.create_connection(("127.0.0.1", fwd.port), timeout=5) as sock:
        # Large enough that the body is still arriving when the forwarder starts sending it on.
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer sk-first\r\nContent-Length: 300000\r\n\r\n"
                     + b"x" * 200000)
        sock.shutdown(socket.SHUT_WR)
        # The forwarder gives up on the request at once instead of waiting on a backend that
        # waits for the other 100 KB (READ_TIMEOUT_SECONDS, 10 minutes by default).
        while sock.recv(65536):
            pass
    assert backend.requests() == []


def test_a_small_body_cut_short_is_400_and_never_sent_as_if_whole(backend, fwd):
    with socket.create_connection(("127.0.0.1", fwd.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer sk-first\r\nContent-Length: 1000\r\n\r\n"
                     b'{"model": "llama", "prompt": "hi"}')
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert status_of(answer) == 400
    assert backend.requests() == []
