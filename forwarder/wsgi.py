"""The WSGI entry point: `gunicorn -c gunicorn.conf.py forwarder.wsgi:app`."""

from . import settings
from .app import create_app

app = create_app(settings.current())
