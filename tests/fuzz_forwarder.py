"""Hostile requests against a running forwarder, over raw sockets.

    python -m tests.fuzz_forwarder [--cases 2000] [--seed 1]

starts a fake vLLM and two forwarders in front of it (one plain, one with FORCED_MODEL_NAME),
sends each `--cases` requests built at random from odd methods, paths that try to leave `/v1/`,
huge and malformed headers, broken chunked encoding, truncated bodies, and bodies that are not
UTF-8 or not JSON (or JSON nested too deep to parse), then checks that

- every complete request got an answer with a clear status (no 5xx, no silence), and every
  request the client cut short was closed within the timeout;
- the backend saw nothing outside `/v1/`;
- the forwarder stayed up: the same workers (none crashed or was restarted), no traceback in its
  log, and a normal request still answered.

`tests/e2e/test_fuzz.py` runs a few hundred cases of it as part of the suite.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import posixpath
import random
import socket
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import requests

# Statuses that say clearly what was wrong with a request (or that it went through).
CLEAR_STATUSES = frozenset((200, 400, 401, 404, 405, 413, 414, 417, 422, 431, 501))
CASE_TIMEOUT_SECONDS = 5.0
# Cases in flight at once: the forwarder must also keep them apart.
PARALLEL_CLIENTS = 8

METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PROPFIND", "TRACE",
           "CONNECT", "BREW", "get", "P0ST", "M" * 40, "PO\x00ST", "G\u00c9T", ""]
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
         "/v1/../metrics", "/v1/%2e%2e/metrics", "/v1/%252e%252e/metrics", "/v1/..%2f_fake/config",
         "/v1/..\\metrics", "/v1/%5c..%5cmetrics", "/v1/%00", "/v1/\u00e9", "/v1/%ff%fe",
         "//v1/models", "/v1//models", "/v1", "/", "*", "/_backends", "/metrics",
         "http://evil.example/v1/models", "//evil.example/v1/models", "/v1/models#frag",
         "/v1/models?x=%00&y=\u00e9&z=../../", "/v1/" + "a" * 9000, "/v1/;/../x",
         "/v1/%c0%ae%c0%ae/metrics", "v1/models", "/%76%31/models"]
VERSIONS = ["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "HTTP/1.1x", "", "http/1.1"]
ODD_HEADERS = [
    b"X-Big: " + b"a" * 9000,
    b"".join(b"X-Many-%d: 1\r\n" % i for i in range(150)).rstrip(b"\r\n"),
    b"Bad Name: 1", b"X-Nul: a\x00b", b"X-Latin: \xff\xfe", b"X-Fold: a\r\n b", b": empty-name",
    b"NoColon", b"Expect: 100-continue", b"Expect: nonsense", b"Content-Type: application/json",
    b"Content-Type: multipart/form-data; boundary=zz", b"Content-Encoding: gzip",
    b"Authorization: Bearer \xff", b"Cookie: a=1", b"X-Forwarded-Host: evil.example",
    b"Host: evil.example", b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: identity", b"Content-Length: -1", b"Content-Length: abc",
    b"Content-Length: 1e3", b"Content-Length: 99999999999999999999999",
    b"Upgrade: websocket", b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
]
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}]}
BODIES = [
    json.dumps(CHAT).encode(),
    json.dumps({**CHAT, "stream": True}).encode(),
    b"\xff\xfe\xfd not utf-8",
    b'{"model": "llama", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    b'{"model": ',
    b"[1, 2, 3]",
    b'"just a string"',
    b"null",
    b'{"model": 7, "messages": {}}',
    b'{"model": "a", "model": "b"}',
    b'{"x": 1e999999, "y": NaN, "z": -Infinity}',
    b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}",
    b"{" * 50000,
    b'{"model": "\\ud800"}',
    b"",
    b"x" * 2_000_000,
]


@dataclasses.dataclass
class Case:
    """One hostile request: the bytes sent (in pieces), and whether the client then stops
    sending without finishing (a request cut short need not be answered)."""
    name: str
    pieces: list
    cut_short: bool = False


def _chunked(body: bytes, rng: random.Random) -> "tuple[bytes, str]":
    """The body in chunked encoding, sometimes broken in one of the ways a parser must survive."""
    pieces = [body[i:i + 8192] for i in range(0, len(body), 8192)] or [b""]
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    breakage = rng.choice(["none"] * 4 + ["bad-size", "no-crlf", "huge-size", "negative",
                                          "extension", "no-end", "bad-trailer", "size-only"])
    if breakage == "bad-size":
        return b"zz\r\nabc\r\n0\r\n\r\n", breakage
    if breakage == "no-crlf":
        return b"3\r\nabcdef0\r\n\r\n", breakage
    if breakage == "huge-size":
        return b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n", breakage
    if breakage == "negative":
        return b"-1\r\nabc\r\n0\r\n\r\n", breakage
    if breakage == "extension":
        return b"3;" + b"x" * 10000 + b"\r\nabc\r\n0\r\n\r\n", breakage
    if breakage == "no-end":
        return encoded, breakage
    if breakage == "bad-trailer":
        return encoded + b"0\r\nBad Trailer\r\n\r\n", breakage
    if breakage == "size-only":
        return b"10\r\nabc", breakage
    return encoded + b"0\r\n\r\n", breakage


def hostile_requests(count: int, seed: int) -> "list[Case]":
    """`count` cases: a well-formed chat request with a few of its parts (method, path, version,
    headers, body, framing) swapped for hostile ones, so that every layer gets its share."""
    rng = random.Random(seed)

    def sometimes(hostile, normal, odds=0.3):
        return rng.choice(hostile) if rng.random() < odds else normal

    cases = []
    for number in range(count):
        method = sometimes(METHODS, "POST")
        path = sometimes(PATHS, "/v1/chat/completions")
        version = sometimes(VERSIONS, "HTTP/1.1", 0.15)
        body = sometimes(BODIES, BODIES[0], 0.6)
        headers = [b"Host: fuzz"] if rng.random() < 0.95 else []
        headers += rng.sample(ODD_HEADERS, k=rng.choice([0, 0, 0, 1, 2]))
        framing = sometimes(["chunked", "chunked", "short", "long", "none", "both"], "length", 0.5)
        cut_short = False
        if framing in ("chunked", "both"):
            headers.append(b"Transfer-Encoding: chunked")
            encoded, breakage = _chunked(body, rng)
            # A client that stops before the end of its chunks cannot expect an answer.
            cut_short = breakage in ("no-end", "size-only", "huge-size")
            if framing == "both":
                headers.append(b"Content-Length: %d" % len(body))
            framing += f"/{breakage}"
            body = encoded
        elif framing == "length":
            headers.append(b"Content-Length: %d" % len(body))
        elif framing == "short":  # says less than it sends: the rest looks like a next request
            headers.append(b"Content-Length: %d" % (len(body) // 2))
        elif framing == "long":  # says more than it sends, then stops
            headers.append(b"Content-Length: %d" % (len(body) + 100))
            cut_short = True
        headers.append(b"Connection: close")
        line = f"{method} {path} {version}".strip().encode("utf-8", "surrogateescape")
        head = line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
        # Some clients send everything at once, some dribble: both must parse the same.
        if rng.random() < 0.2:
            cut = rng.randrange(1, len(head))
            pieces = [head[:cut], head[cut:], body]
        else:
            pieces = [head + body]
        name = f"#{number} {method[:12]!r} {path[:40]!r} {version!r} {framing} " \
               f"body={len(body)}B headers={[h[:24] for h in headers[1:-1]]}"
        cases.append(Case(name, [p for p in pieces if p], cut_short))
    return cases


@dataclasses.dataclass
class Outcome:
    case: Case
    status: "int | None"
    closed: bool
    head: bytes


def send_case(port: int, case: Case, timeout: float = CASE_TIMEOUT_SECONDS) -> Outcome:
    """Send one case; read until the forwarder closes the connection or `timeout` passes."""
    answer = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        deadline = time.monotonic() + timeout
        try:
            for piece in case.pieces:
                sock.sendall(piece)
            if case.cut_short:
                sock.shutdown(socket.SHUT_WR)
            while time.monotonic() < deadline:
                chunk = sock.recv(65536)
                if not chunk:
                    closed = True
                    break
                answer += chunk
        except socket.timeout:
            pass
        except OSError:  # reset: the forwarder refused to read more
            closed = True
    return Outcome(case, final_status(answer), closed, answer[:300])


def final_status(answer: bytes) -> "int | None":
    """The status of the final response (after any `100 Continue`), or None."""
    while answer.startswith(b"HTTP/"):
        try:
            status = int(answer.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return None
        if status >= 200 or b"\r\n\r\n" not in answer:
            return status
        answer = answer.split(b"\r\n\r\n", 1)[1]
    return None


def problems_with(outcome: Outcome) -> "str | None":
    """Why an outcome is not acceptable, or None."""
    if outcome.case.cut_short:
        if outcome.status is None and not outcome.closed:
            return "a request cut short left the connection open"
        if outcome.status is not None and outcome.status >= 500 and outcome.status != 501:
            return f"status {outcome.status}"
        return None
    if outcome.status is None:
        return "no status" + ("" if outcome.closed else " and the connection left open")
    if outcome.status not in CLEAR_STATUSES:
        return f"status {outcome.status}"
    if not outcome.closed:
        return "the connection stayed open after `Connection: close`"
    return None


def path_left_v1(raw_path: str) -> bool:
    path = urllib.parse.urlsplit(raw_path).path
    for _ in range(5):
        path = urllib.parse.unquote(path)
    return not posixpath.normpath(path).startswith("/v1/")


def worker_pids(log: str) -> "list[str]":
    return [line.rsplit(" ", 1)[-1] for line in log.splitlines() if "Booting worker" in line]


@dataclasses.dataclass
class Report:
    cases: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list = dataclasses.field(default_factory=list)


def fuzz(forwarder, backend, count: int, seed: int, report: Report) -> Report:
    """Run `count` cases (PARALLEL_CLIENTS at a time) against a started forwarder (harness.Forwarder) in front of `backend`
    (harness.FakeBackend); add what happened to `report`."""
    workers_before = worker_pids(forwarder.log())
    backend.reset()
    cases = hostile_requests(count, seed)
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_CLIENTS) as pool:
        outcomes = list(pool.map(lambda case: send_case(forwarder.port, case), cases))
    for case, outcome in zip(cases, outcomes):
        report.cases += 1
        report.statuses[outcome.status] += 1
        problem = problems_with(outcome)
        if problem:
            report.failures.append(f"{case.name}: {problem}: {outcome.head!r}")
    for seen in backend.requests():
        if path_left_v1(seen["path"]):
            report.failures.append(f"the backend saw {seen['method']} {seen['path']!r}")
    with requests.Session() as http:
        http.trust_env = False
        response = http.post(forwarder.url + "/v1/chat/completions", json=CHAT, timeout=10)
    if response.status_code != 200:
        report.failures.append(f"a normal request afterwards got {response.status_code}")
    log = forwarder.log()
    if forwarder.proc.poll() is not None:
        report.failures.append(f"the forwarder exited with {forwarder.proc.returncode}")
    if worker_pids(log) != workers_before:
        report.failures.append(f"workers changed: {workers_before} -> {worker_pids(log)}")
    if "Traceback" in log:
        report.failures.append("a traceback in the forwarder's log:\n" + log[log.index("Traceback"):][:3000])
    return report


CONFIGS = {"plain": {}, "forced-model": {"FORCED_MODEL_NAME": "llama"}}
COMMON_ENV = {"MAX_REQUEST_BODY_BYTES": "1000000"}


def main(argv=None) -> int:
    from tests.harness import FakeBackend, Forwarder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000, help="cases per forwarder")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as scratch:
        backend = FakeBackend.start(log_dir=Path(scratch))
        try:
            for name, env in CONFIGS.items():
                forwarder = Forwarder.start([backend.url], env={**COMMON_ENV, **env},
                                            wait_healthy=1, log_dir=Path(scratch))
                started = time.monotonic()
                try:
                    fuzz(forwarder, backend, args.cases, args.seed, report)
                finally:
                    forwarder.stop()
                print(f"{name}: {args.cases} cases in {time.monotonic() - started:.1f} s")
        finally:
            backend.stop()
    print(f"cases tried: {report.cases}")
    print("statuses:", dict(sorted(report.statuses.items(), key=lambda kv: str(kv[0]))))
    for failure in report.failures:
        print("FAIL", failure)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
