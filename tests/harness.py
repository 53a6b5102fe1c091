"""Process helpers for end-to-end tests: a fake vLLM backend and the forwarder, each a subprocess.

Both are started from the repository root with this interpreter, log to a file (never a pipe
that nobody drains), are waited on through HTTP with a deadline, and are stopped by PID.
`tests/e2e/conftest.py` wraps them in fixtures that stop everything even when a test fails.
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import requests
import urllib3

REPO_ROOT = Path(__file__).resolve().parent.parent
# The User-Agent of the forwarder's health polls (`forwarder.fleet.poller.POLL_USER_AGENT`).
POLL_USER_AGENT = "vllm-forwarder-health"
LISTENING = re.compile(r"fake vllm listening on http://\S+:(\d+)")
# gunicorn's line once it listens: the port it was given (0: one of the kernel's choosing).
GUNICORN_LISTENING = re.compile(r"Listening at: https?://127\.0\.0\.1:(\d+)")
ACCESS_LINE = re.compile(r"request_id=\S+ method=\S+ path=\S+ status=\d+ .*")
FIELD = re.compile(r"(\w+)=(\S+)")


def _request(method, url, **kwargs):
    """One request on a connection of its own, closed once answered: no proxy from the
    environment, and no idle keep-alive left behind (gunicorn's gevent worker waits for those on
    SIGTERM, up to graceful_timeout)."""
    with requests.Session() as session, warnings.catch_warnings():
        session.trust_env = False
        # A test's own TLS certificate (`--certfile`), on loopback: not checked.
        session.verify = False
        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
        return session.request(method, url, **kwargs)


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago, for a program that cannot tell which port
    it bound (vllm-router, in bench/). Tests bind port 0 and read it back instead: another
    process may take this one before it is bound."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def closed_port():
    """A port of 127.0.0.1 that refuses connections for as long as the block lasts: bound, so
    that no other process takes it, but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def wait_until(predicate, timeout=5.0, interval=0.02, message="condition not met"):
    """Poll `predicate` until it returns something truthy, and return that.

    Raises AssertionError(message) after `timeout` seconds; `message` may be a callable, called
    only then (to include a log, say).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(interval)


def _log_dir(log_dir, prefix):
    """A fresh directory for one process's files, inside `log_dir` when given."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=log_dir))


def _spawn(command, log_path, env=None):
    """Start `command` from the repository root, output to `log_path`, in a process group of
    its own (its ID is the PID) so that `_stop` can reach the children a SIGKILL would orphan."""
    with open(log_path, "a") as log:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_process(proc, timeout=10, sig=signal.SIGTERM):
    """`sig` by PID; after `timeout` seconds SIGKILL its process group (gunicorn's workers
    too, and any left behind by a master that already died); the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return proc.wait()


def read_response(sock, timeout=10):
    """One whole HTTP/1.1 response from `sock` (Content-Length or chunked): (head, body); b""
    for the head when the connection ended before a response."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            return b"", b""
        data += piece
    head, rest = data.split(b"\r\n\r\n", 1)
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    if length:
        while len(rest) < int(length.group(1)):
            piece = sock.recv(65536)
            assert piece, "closed mid-body"
            rest += piece
        return head, rest
    while not rest.endswith(b"0\r\n\r\n"):
        piece = sock.recv(65536)
        assert piece, "closed mid-body"
        rest += piece
    return head, rest


def chat(stream=False, content="hi", model="llama", **extra):
    """A chat completion request body."""
    return {"model": model, "stream": stream,
            "messages": [{"role": "user", "content": content}], **extra}


def get_json(fwd, path):
    """GET `path` of the forwarder on a connection of its own (so that any of its workers may
    answer); the JSON answer."""
    return _request("GET", fwd.url + path, timeout=5, headers=fwd._admin_headers()).json()


def log_lines(process, pattern):
    """The lines of a helper process's log that match `pattern` (a regular expression)."""
    return [line for line in process.log().splitlines() if re.search(pattern, line)]


def log_tail(path, lines=40):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class _Process:
    """A helper process started by a test: its `proc` (subprocess.Popen) and `log_path`."""

    proc = None
    log_path = None

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return self.log_path.read_text(errors="replace")


class FakeBackend(_Process):
    """A `python -m tests.fake_vllm` subprocess and its control API."""

    def __init__(self, name, config, log_dir, host="127.0.0.1"):
        self.name = name
        self.host = host
        self.start_config = config or {}
        self.log_dir = log_dir
        self.log_path = log_dir / "fake_vllm.log"
        self.port = None
        self.proc = None

    @classmethod
    def start(cls, name=None, port=None, config=None, log_dir=None,
              host="127.0.0.1") -> "FakeBackend":
        """Start a fake on loopback address `host` (`127.0.0.2`, `::1` …); `port=None` lets it
        pick a free one. Waits until it answers (10 s)."""
        backend = cls(name, config, _log_dir(log_dir, "fake-vllm-"), host)
        backend._launch(port or 0)
        return backend

    def _launch(self, port):
        command = [sys.executable, "-m", "tests.fake_vllm", "--host", self.host,
                   "--port", str(port)]
        if self.name:
            command += ["--name", self.name]
        if self.start_config:
            command += ["--config", json.dumps(self.start_config)]
        self.proc = _spawn(command, self.log_path)
        self.port = port

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"fake vllm exited with {self.proc.returncode}:\n"
                                     f"{log_tail(self.log_path)}")
            if not self.port:
                found = LISTENING.findall(self.log_path.read_text(errors="replace"))
                self.port = int(found[-1]) if found else 0
            return self.port and self._answers()

        wait_until(ready, timeout=10, message=lambda: (
            f"fake vllm not answering on port {self.port or port} within 10 s:\n"
            f"{log_tail(self.log_path)}"))
        self.name = self.name or f"{self.host}:{self.port}"

    def _answers(self):
        try:
            return _request("GET", self.url + "/_fake/config", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    @property
    def url(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def alive(self):
        return self.proc.poll() is None

    def _control(self, method, path, body=None):
        response = _request(method, self.url + "/_fake/" + path, json=body, timeout=5)
        response.raise_for_status()
        return response.json()

    def configure(self, **config):
        """Merge `config` into the fake's config (keys as in `fake_vllm.DEFAULTS`); the result."""
        return self._control("POST", "config", config)

    def reset(self):
        """Forget recorded requests and disconnects; config back to the start-up config."""
        return self._control("POST", "reset")

    def requests(self, include_polls=False):
        """Every /v1 request received: dicts with id, time, method, path (raw, with the query),
        headers (lower-case name -> list of values), body_b64, body_length, body_sha256, json.
        The forwarder's own polls of `/v1/models` are left out unless `include_polls`."""
        recorded = self._control("GET", "requests")
        if include_polls:
            return recorded
        return [r for r in recorded if r["headers"].get("user-agent") != [POLL_USER_AGENT]]

    def _poll_ids(self):
        return {r["id"] for r in self._control("GET", "requests")
                if r["headers"].get("user-agent") == [POLL_USER_AGENT]}

    def polls(self):
        """The time (Unix seconds) of every GET /metrics it answered."""
        return self._control("GET", "polls")

    def disconnects(self):
        """Every /v1 response whose client left early: request_id, time, method, path,
        chunks_sent (the forwarder's own polls of `/v1/models` left out)."""
        polls = self._poll_ids()
        return [d for d in self._control("GET", "disconnects") if d["request_id"] not in polls]

    def kill(self):
        """SIGKILL, and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def stop(self, grace=3.0):
        """SIGTERM, then SIGKILL after `grace` seconds."""
        return stop_process(self.proc, grace)

    def restart(self, grace=3.0):
        """Stop it if running (`stop`), then start it again on the same port with the start-up
        config."""
        self.stop(grace)
        self._launch(self.port)
        return self


class FakeDns(_Process):
    """A `python -m tests.fake_dns` subprocess on 127.0.0.1 and the zone file it answers from."""

    def __init__(self, log_dir):
        self.zone_path = log_dir / "zone.json"
        self.log_path = log_dir / "fake_dns.log"
        self.port = None
        self.proc = None

    @classmethod
    def start(cls, records=None, log_dir=None) -> "FakeDns":
        """Start it answering `records` (name -> {"A": [...], "AAAA": [...]}); waits (10 s)
        until it is listening."""
        fake = cls(_log_dir(log_dir, "fake-dns-"))
        fake.set_zone(records or {})
        fake.proc = _spawn([sys.executable, "-m", "tests.fake_dns", "--zone", str(fake.zone_path)],
                           fake.log_path)

        def listening():
            if fake.proc.poll() is not None:
                raise AssertionError(f"fake dns exited with {fake.proc.returncode}:\n"
                                     f"{log_tail(fake.log_path)}")
            found = re.findall(r"fake dns listening on 127\.0\.0\.1:(\d+)", fake.log())
            return int(found[-1]) if found else None

        fake.port = wait_until(listening, timeout=10, message="fake dns not listening in 10 s")
        return fake

    def set_zone(self, records, mode="answer"):
        """Answer from now on with `records`; `mode` "servfail" or "hang" fails every question."""
        staging = self.zone_path.with_suffix(".tmp")
        staging.write_text(json.dumps({"mode": mode, "records": records}))
        os.replace(staging, self.zone_path)  # the server never reads a half-written zone

    @property
    def address(self):
        """The `DNS_SERVER` setting that points at it."""
        return f"127.0.0.1:{self.port}"


    def questions(self):
        """Every question received so far, as (name, type, mode) tuples."""
        return re.findall(r"^question (\S+) (\S+) (\S+)$", self.log(), re.MULTILINE)

    def stop(self):
        return stop_process(self.proc, 3)


class Forwarder(_Process):
    """The forwarder under gunicorn, as an operator starts it, on a port the kernel chose (port 0,
    read back from gunicorn's log: no other process can take it in between)."""

    def __init__(self, ip_lines, env, workers, extra_args, log_dir):
        self.dir = log_dir
        self.ip_file = log_dir / "ip.txt"
        self.ip_file.write_text("".join(f"{line}\n" for line in ip_lines))
        self.log_path = log_dir / "forwarder.log"
        self.env = dict(env or {})
        self.workers = workers
        self.extra_args = list(extra_args)
        self.port = None
        self.proc = None

    def _command(self):
        return [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "forwarder.wsgi:app",
                "--bind", "127.0.0.1:0", "--workers", str(self.workers),
                "--no-control-socket", *self.extra_args]

    def _environment(self):
        environment = dict(os.environ, PYTHONUNBUFFERED="1", CHECK_INTERVAL_SECONDS="0.2",
                           IP_LIST_FILE=str(self.ip_file))
        for key, value in self.env.items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        return environment

    def _popen(self):
        self.proc = _spawn(self._command(), self.log_path, self._environment())

    def _listening(self) -> bool:
        """Whether gunicorn listens yet; reads its port off its log the first time."""
        if self.port is None:
            found = GUNICORN_LISTENING.search(self.log())
            self.port = int(found.group(1)) if found else None
        return self.port is not None

    @classmethod
    def start(cls, ip_lines, env=None, workers=1, extra_args=(), wait_healthy=None,
              log_dir=None, listening_only=False) -> "Forwarder":
        """Start gunicorn; wait (15 s) until GET /_backends answers 200, and, when
        `wait_healthy` is given, until it reports that many healthy backends. With
        `listening_only`, only until gunicorn's master listens (its workers may not accept yet:
        connections wait in the listen queue)."""
        forwarder = cls(ip_lines, env, workers, extra_args, _log_dir(log_dir, "forwarder-"))
        forwarder._popen()

        def ready():
            if forwarder.proc.poll() is not None:
                raise AssertionError(f"forwarder exited with {forwarder.proc.returncode}:\n"
                                     f"{log_tail(forwarder.log_path)}")
            if not forwarder._listening() or listening_only:
                return forwarder.port is not None
            try:
                response = _request("GET", forwarder.url + "/_backends", timeout=1,
                                    headers=forwarder._admin_headers())
            except requests.RequestException:
                return False
            if response.status_code != 200:
                return False
            return wait_healthy is None or response.json()["healthy"] == wait_healthy

        try:
            wait_until(ready, timeout=15, message=lambda: (
                f"forwarder not ready (wait_healthy={wait_healthy}) within 15 s:\n"
                f"{log_tail(forwarder.log_path)}"))
        except BaseException:
            forwarder.stop()
            raise
        return forwarder

    @classmethod
    def run_expecting_failure(cls, env, ip_lines=("127.0.0.1:1",), timeout=15, log_dir=None):
        """Run the same command and wait for it to exit: (returncode, combined output)."""
        forwarder = cls(ip_lines, env, 1, (), _log_dir(log_dir, "forwarder-"))
        forwarder._popen()
        try:
            returncode = forwarder.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            forwarder.stop()
            raise AssertionError(f"forwarder still running after {timeout} s:\n"
                                 f"{log_tail(forwarder.log_path)}") from None
        return returncode, forwarder.log()

    def _admin_headers(self):
        key = self.env.get("ADMIN_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def url(self):
        scheme = "https" if "--certfile" in self.extra_args else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def backends(self):
        """The GET /_backends JSON."""
        response = _request("GET", self.url + "/_backends", timeout=5,
                            headers=self._admin_headers())
        response.raise_for_status()
        return response.json()

    def access_lines(self):
        """Each access log line as a dict of its key=value fields, in order."""
        return [dict(FIELD.findall(line)) for line in self.log().splitlines()
                if ACCESS_LINE.search(line)]

    def worker_pids(self):
        """The PIDs of the gunicorn master's live children, from /proc."""
        pids = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[1]) == self.pid:
                pids.add(int(entry))
        return pids

    def stop(self, timeout=10, graceful=False):
        """Stop gunicorn, then SIGKILL after `timeout` s; the exit code. By default with SIGINT,
        gunicorn's quick shutdown, which spares tests the graceful drain's one-second ticks;
        `graceful=True` sends SIGTERM, as an orchestrator does."""
        return stop_process(self.proc, timeout, signal.SIGTERM if graceful else signal.SIGINT)


@contextlib.contextmanager
def backend_behind_forwarder(tmp_path_factory, backend_config=None, env=None):
    """A FakeBackend and a Forwarder in front of it, for module-scoped fixtures that share one
    pair between tests; both are stopped on exit, whatever happened."""
    backend = FakeBackend.start(config=backend_config,
                                log_dir=tmp_path_factory.mktemp("fake_vllm"))
    try:
        fwd = Forwarder.start([backend.url], env=env, wait_healthy=1,
                              log_dir=tmp_path_factory.mktemp("forwarder"))
        try:
            yield backend, fwd
        finally:
            fwd.stop()
    finally:
        backend.stop()
