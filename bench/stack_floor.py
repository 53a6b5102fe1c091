"""What this stack costs before any forwarding: the floor under the forwarder's CPU per request.

A forwarder on gunicorn's gevent worker, Flask and requests does at least two things per request:
it answers an HTTP request in Flask on that worker, and it makes one HTTP exchange with requests.
This module measures each alone, on the same machine and in the same run as the forwarder
(`bench/run.py`, scenario 0), so their sum says how much of the forwarder's figure is the stack
and how much is its own work.

    gunicorn -k gevent -w 1 bench.stack_floor:app          # Flask answering by itself
    python -m bench.stack_floor URL COUNT                  # one requests exchange, COUNT times

`app` answers every POST with the fake backend's chat completion, as the forwarder would relay
it. The client mode sends COUNT requests to URL one after another through `forwarder.upstream`
(a pooled requests Session, the request prepared and handed to its adapter, the body read raw:
exactly the forwarder's upstream path), on a gevent-patched process as a worker is, and prints
`{"cpu_us_per_request": ...}`: the process's CPU time per exchange.
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402  (after the patch, as in a gunicorn gevent worker)
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from flask import Flask, Response  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.fake_backend import CHAT_BODY as ANSWER  # noqa: E402
from bench.load import CHAT_BODY, CHAT_PATH  # noqa: E402

app = Flask(__name__)


@app.post(CHAT_PATH)
def chat():
    return Response(ANSWER, mimetype="application/json")


def client(url: str, count: int) -> float:
    """CPU seconds of this process per exchange, over `count` exchanges after a warm-up."""
    from forwarder import upstream

    headers = {"Content-Type": "application/json", "Host": "backend"}

    def exchange():
        response = upstream.send("POST", url + CHAT_PATH, headers, CHAT_BODY, 5, 30)
        response.read()
        response.release_conn()

    for _ in range(20):
        exchange()
    started = time.process_time()
    for _ in range(count):
        exchange()
    return (time.process_time() - started) / count


if __name__ == "__main__":
    base_url, requests_count = sys.argv[1], int(sys.argv[2])
    print(json.dumps({"cpu_us_per_request": client(base_url, requests_count) * 1e6}))
