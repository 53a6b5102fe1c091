"""The access log: one line per request, written by gunicorn once the response has ended.

    [27/Nov/2026:15:19:19 +0000] request_id=4ee66f6d… method=POST path=/v1/chat/completions
    status=200 backend=http://10.0.0.11:8101 duration=1.804113 ttfb=0.051270 bytes=1661
    cut=- resumed=0 model=llama-3.1-8b key=team-a prompt_tokens=12 completion_tokens=7
    client=10.0.0.2 pid=24611

(one line). `AccessLogger` is gunicorn's own logger (`logger_class` in `gunicorn.conf.py`), so
`--access-logfile`, syslog, log configs and reopening on `SIGUSR1` work as usual, and it logs
every request, with the bytes gunicorn really wrote. Only the line is built directly from what
is needed: gunicorn's generic `access_log_format` machinery copies every header and environ
entry for each request, which costs ~100 µs of CPU against ~20 µs for this. An operator's own
`--access-logformat` is still honoured, through gunicorn's generic path.

The app leaves what gunicorn cannot know in the WSGI environ (`environ_keys.py`); a field that
does not apply to a request (no backend, no body relayed, a response that ended whole) is `-`.
"""

import os
import re
import time

from gunicorn.glogging import Logger

from .. import environ_keys
from ..compat.server import operator_access_log_format

# What a field taken from a request (its model) may hold as it is; anything else is %-escaped, so
# that no client can break a line or forge a field.
_UNSAFE = re.compile(rb"[^!#-\[\]-~]")


def _safe(value: str) -> str:
    data = value.encode("utf-8", "surrogatepass")[:256]
    return _UNSAFE.sub(lambda m: b"%%%02X" % m.group()[0], data).decode("ascii")


LINE = ("%s request_id=%s method=%s path=%s status=%s backend=%s duration=%.6f ttfb=%s "
        "bytes=%s cut=%s resumed=%s model=%s key=%s prompt_tokens=%s completion_tokens=%s "
        "client=%s pid=%d")


class AccessLogger(Logger):
    """gunicorn's logger, writing the forwarder's access line."""

    def setup(self, cfg):
        super().setup(cfg)
        self._operator_format = operator_access_log_format(cfg)

    def access(self, resp, req, environ, request_time):
        if not self.access_log_enabled:
            return
        if self._operator_format:
            super().access(resp, req, environ, request_time)
            return
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        sent = resp.sent
        key = environ.get(environ_keys.API_KEY)
        self.access_log.info(
            LINE, time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
            environ.get(environ_keys.REQUEST_ID, "-"), environ["REQUEST_METHOD"],
            environ["RAW_URI"], status, environ.get(environ_keys.BACKEND, "-"),
            request_time.total_seconds(), environ.get(environ_keys.TTFB, "-"),
            "-" if sent is None else sent, environ.get(environ_keys.CUT, "-"),
            environ.get(environ_keys.RESUMED, 0),
            _safe(environ.get(environ_keys.MODEL, "-")), key.label if key is not None else "-",
            environ.get(environ_keys.PROMPT_TOKENS, "-"),
            environ.get(environ_keys.COMPLETION_TOKENS, "-"),
            environ.get("REMOTE_ADDR", "-"), os.getpid())
