"""The client-gone watch through a running gunicorn: a kept-alive client that sends its next
request while the first still waits on the backend is not taken for gone. (A client that really
leaves is tests/e2e/test_faults.py's.)"""

import json
import socket

BODY = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]}).encode()


def ip_lines(*backends):
    return [f"127.0.0.1:{b.port}" for b in backends]


def raw_request(body=BODY):
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: fwd\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def test_pipelined_next_request_is_not_a_disconnect(fake_backend, forwarder):
    backend = fake_backend(config={"first_byte_delay": 0.5})
    fwd = forwarder(ip_lines(backend), wait_healthy=1)
    with socket.create_connection(("127.0.0.1", fwd.port)) as client:
        client.settimeout(10)
        # The second request arrives while the first waits on the backend: the socket becomes
        # readable, but with data, so the first must still be answered.
        client.sendall(raw_request() + raw_request())
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            chunk = client.recv(65536)
            assert chunk, f"connection closed early: {data!r}"
            data += chunk
    assert backend.disconnects() == []
