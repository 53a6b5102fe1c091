"""gunicorn settings for vLLM Forwarder: `gunicorn -c gunicorn.conf.py forwarder.wsgi:app`.

gunicorn's own command-line flags (`--bind`, `--workers` …) and `GUNICORN_CMD_ARGS` override what
is set here. The forwarder's settings are environment variables (`forwarder/settings.py`); they
are validated here, in the master, so a bad one stops start-up before any worker is forked, and
every worker inherits them loaded. This file holds gunicorn's settings and what the master sets
up; everything a worker does, from start to exit, is `forwarder.worker.Worker`.
"""

import glob
import os
import shutil
import sys
import tempfile

# prometheus-client's multiprocess mode, so that /metrics adds up every worker's figures. The
# variable must be set before prometheus_client is first imported in any process, so here, first
# thing in the master: workers inherit it. An operator's own directory is kept but emptied of the
# last run's files; otherwise a fresh one is made, and removed at exit (`on_exit`). A reload
# (SIGHUP) runs this file again in the same master and keeps its directory and figures; a new
# master from a binary upgrade (SIGUSR2) inherits the variable but gets a directory of its own.
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_metrics_owner = os.environ.get("VLLM_FORWARDER_METRICS_MASTER")
_own_metrics_dir = _metrics_owner is not None or not _metrics_dir
if _metrics_owner == str(os.getpid()):
    pass
elif _own_metrics_dir:
    _metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(
        prefix="vllm-forwarder-metrics-")
    os.environ["VLLM_FORWARDER_METRICS_MASTER"] = str(os.getpid())
else:
    os.makedirs(_metrics_dir, exist_ok=True)
    for _stale in glob.glob(os.path.join(_metrics_dir, "*.db")):
        os.remove(_stale)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from forwarder.host import table as _host_table  # noqa: E402  (needs the path above)
from forwarder import settings as _settings  # noqa: E402

try:
    _settings.current(reload=True)
except _settings.SettingError as _exc:
    print(f"vllm-forwarder: bad setting {_exc}", file=sys.stderr)
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
    sys.exit(2)

# What the workers of this instance share (forwarder/host/table.py): made here, in the master,
# before the first fork, so every worker maps the same memory; a reload (SIGHUP) keeps it.
_table = _host_table.shared()

bind = "0.0.0.0:9000"
# gunicorn's gevent worker, with the forwarder's poller, first-cycle gate and drain.
worker_class = "forwarder.worker.Worker"
workers = os.cpu_count() or 1
# Counts every open connection, streams and idle keep-alives alike; a full worker stops accepting.
# 10,000 open streams per box, however unevenly the workers happen to accept them. Each stream
# holds two file descriptors (client and backend): raise `ulimit -n` to match (docs/deploy.md,
# "Sizing").
worker_connections = 10000
# For gevent workers this is only a heartbeat (sent every second by the worker's own loop): a
# long stream never trips it, a hub blocked by CPU work for this long does.
timeout = 30
# Running streams get this long to finish after SIGTERM.
graceful_timeout = 60
# Longer than a load balancer's usual 60 s idle timeout, so it never reuses a connection that
# gunicorn is closing (the 502 race).
keepalive = 75
# Recycling a worker would cut its live streams.
max_requests = 0
# Request-line and header limits, set deliberately (docs/security.md): what an nginx in front
# passes with its default 8 KB header buffers passes here too; past them gunicorn answers 414 or
# 431 before the application sees the request. The request line allows long query strings (the
# most gunicorn accepts); 100 header fields is far above what an SDK sends (about 15).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# gunicorn >= 25 opens a control socket at a fixed per-user path; two instances would clobber it.
control_socket_disable = True
# One access log line per request, written once its response has ended, with its request id,
# backend, duration and time to first byte (forwarder/observe/access_log.py);
# `--access-logfile` and `--access-logformat` override as usual.
accesslog = "-"
logger_class = "forwarder.observe.access_log.AccessLogger"


def pre_fork(server, worker):
    # Each worker writes its own row of the host table.
    worker.slot = _table.claim_slot()


def child_exit(server, worker):
    # A dead worker's in-flight requests are over: its row of the host table is cleared, and its
    # live gauges leave /metrics. Its counters and histograms stay, so the totals survive a
    # worker restart.
    from prometheus_client import multiprocess

    _table.release_slot(worker.slot)
    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
