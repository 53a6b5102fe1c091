"""The upstream pool's check that a kept-alive backend connection is still open before reuse."""

import socket
import threading

from forwarder import upstream


def test_connection_closed_by_the_backend_is_not_reused():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    answered = threading.Semaphore(0)

    def serve(count):
        # Keep-alive in the headers, yet each connection is closed after one answer, as a
        # backend restarting between two requests does.
        for _ in range(count):
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            answered.release()

    thread = threading.Thread(target=serve, args=(3,), daemon=True)
    thread.start()
    try:
        for _ in range(3):
            response = upstream.send("GET", f"http://127.0.0.1:{port}/v1/models", {}, None, 5, 5)
            assert (response.status, response.read1(100)) == (200, b"ok")
            response.close()
            assert answered.acquire(timeout=5)  # the server has closed this connection
        thread.join(5)
    finally:
        server.close()
