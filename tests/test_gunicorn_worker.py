"""The worker's client sockets (forwarder/gunicorn_worker.py): a write the kernel takes only in
part is finished by gevent's `sendall`, every byte in order (every end-to-end test writes through
them too); and gunicorn's own TLS (`--certfile`) is left alone."""

import socket
import subprocess

import gevent
import gevent.socket
import requests

from forwarder.gunicorn_worker import _ClientSocket


def client_pair(send_buffer=None):
    left, right = gevent.socket.socketpair()
    left.__class__ = _ClientSocket
    if send_buffer:
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, send_buffer)
    return left, right


def read_all(sock, size):
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(65536)
        assert piece, "closed early"
        data += piece
    return bytes(data)


def test_a_write_larger_than_the_buffers_arrives_whole_and_in_order():
    left, right = client_pair(send_buffer=4096)
    payload = bytes(range(256)) * 16 * 1024  # 4 MiB, far past both buffers
    with left, right:
        reader = gevent.spawn(read_all, right, len(payload))
        left.sendall(payload)
        assert reader.get(timeout=5) == payload


def test_gunicorns_own_tls_still_serves_streams(fake_backend, forwarder, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    backend = fake_backend(config={"tokens": 20})
    fwd = forwarder([backend.url], wait_healthy=1,
                    extra_args=["--certfile", str(cert), "--keyfile", str(key)])
    assert fwd.url.startswith("https://")
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with requests.Session() as http:
        http.trust_env = False
        response = http.post(fwd.url + "/v1/chat/completions", json=body, verify=str(cert))
    assert response.status_code == 200
    assert response.text.count("data: ") == 20 + 3  # role, 20 tokens, finish, [DONE]
    assert response.text.endswith("data: [DONE]\n\n")
