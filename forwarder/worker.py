"""What runs in each gunicorn worker besides serving requests: its health poller.

Started from `post_fork` in `gunicorn.conf.py` inside a greenlet, so that everything imported and
created here is made after gevent has patched the worker.
"""

from . import settings, upstream
from .health import Poller
from .registry import REGISTRY


def run(worker_connections: int) -> None:
    """Size the upstream pool for this worker's concurrency, then poll the fleet forever."""
    upstream.configure(pool_maxsize=worker_connections)
    Poller(REGISTRY, settings.load()).run_forever()
