"""Unit tests for the access log line (`forwarder/observe/access_log.py`)."""

import os
from datetime import timedelta

from gunicorn.config import Config

from forwarder.observe.access_log import AccessLogger
from tests.harness import FIELD


def test_an_operators_access_log_format_is_honoured(tmp_path):
    class Response:
        status, sent, headers = "201 Created", 12, [("X-Request-Id", "r-1")]

    class Request:
        headers = [("USER-AGENT", "curl")]

    environ = {"REQUEST_METHOD": "GET", "RAW_URI": "/v1/models?x=1", "PATH_INFO": "/v1/models",
               "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "10.0.0.2",
               "forwarder.request_id": "r-1", "forwarder.backend": "http://b:1"}
    lines = []
    for access_log_format in (None, '%(s)s "%(r)s" %({forwarder.backend}e)s %(b)s'):
        config = Config()
        config.set("accesslog", str(tmp_path / "access.log"))
        if access_log_format:
            config.set("access_log_format", access_log_format)
        logger = AccessLogger(config)
        logger.access(Response(), Request(), environ, timedelta(seconds=1, microseconds=5))
        lines = (tmp_path / "access.log").read_text().splitlines()
    default, operator = lines
    fields = dict(FIELD.findall(default))
    assert fields == {"request_id": "r-1", "method": "GET", "path": "/v1/models?x=1",
                      "status": "201", "backend": "http://b:1", "duration": "1.000005",
                      "ttfb": "-", "bytes": "12", "cut": "-", "resumed": "0", "model": "-",
                      "key": "-", "prompt_tokens": "-", "completion_tokens": "-",
                      "client": "10.0.0.2", "pid": str(os.getpid())}
    assert operator == '201 "GET /v1/models?x=1 HTTP/1.1" http://b:1 12'


def test_a_model_named_by_the_client_cannot_break_the_line_or_forge_a_field(tmp_path):
    config = Config()
    config.set("accesslog", str(tmp_path / "access.log"))
    logger = AccessLogger(config)

    class Response:
        status, sent, headers = "200 OK", 1, []

    environ = {"REQUEST_METHOD": "POST", "RAW_URI": "/v1/completions",
               "forwarder.model": "x status=500\ncaf\u00e9 \ud800"}
    logger.access(Response(), None, environ, timedelta(seconds=1))
    (line,) = (tmp_path / "access.log").read_text().splitlines()
    fields = dict(FIELD.findall(line))
    assert fields["status"] == "200"
    assert fields["model"] == "x%20status=500%0Acaf%C3%A9%20%ED%A0%80"
