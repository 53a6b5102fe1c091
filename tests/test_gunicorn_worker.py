"""The worker's client sockets (forwarder/gunicorn_worker.py): a write the kernel takes only in
part is finished by gevent's `sendall`, every byte in order. (Every end-to-end test writes
through them too.)"""

import socket

import gevent
import gevent.socket

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
