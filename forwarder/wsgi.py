"""The WSGI entry point: `gunicorn -c gunicorn.conf.py forwarder.wsgi:app`."""

import logging

from . import settings
from .app import create_app

# The forwarder's log lines go wherever gunicorn sends its error log.
_log = logging.getLogger("forwarder")
_log.handlers = logging.getLogger("gunicorn.error").handlers
_log.setLevel(logging.INFO)
_log.propagate = False

app = create_app(settings.load())
