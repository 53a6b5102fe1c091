"""Every reach into a dependency's private or undocumented behaviour, fenced in one place.

The forwarder leans on a few things its libraries do but do not promise. Each lives here, named
for what it is used for, with a canary test in `tests/unit/test_compat.py` that fails with a
message saying which assumption an upgrade broke ("gevent no longer ...").

`server` (gunicorn and gevent; safe to import in gunicorn's master):
- `raw_socket`: a gevent socket's OS-level socket (`_sock`), for a `send` or `recv` that never
  waits in the hub.
- `GeventWorker.handle`: a live gevent client socket re-classed (`__class__`) to one whose
  `sendall` tries one plain `send` first.
- `GeventWorker.idle_wait`: gunicorn's async worker waits for a connection's next request inside
  `self.timeout_ctx()`, which the worker replaces to end that wait at shutdown.
- `GeventWorker.after_error_answer`: called from `handle_error`, once gunicorn has written its
  own error answer to a request it could not parse.
- `close_connection`: `start_response` is a bound method of gunicorn's `Response`, whose
  `force_close()` makes it write `Connection: close` and end the connection after the answer.
- `write_now`: the same `Response`'s `write`, called outside the body's iteration (an SSE
  keep-alive comment while the backend is silent).
- `GeventWorker.accepting`: gunicorn's gevent worker makes its servers from the module-level name
  `StreamServer` of `gunicorn.workers.ggevent`, which the worker process points at a subclass
  that remembers them, so that it can stop and start their accepting.
- `operator_access_log_format`: whether the operator set `access_log_format` (`cfg.settings`).

`client` (requests and urllib3; imported only once gevent has patched the process):
- `BackendAdapter`: urllib3's pooled connections with their `is_connected` check asked of the
  kernel, and `getresponse` raising `StaleConnection` for a connection closed unanswered (urllib3
  lets an exception that is none of its own or `OSError` pass through unwrapped, and requests
  too); installed through `PoolManager.pool_classes_by_scheme`.
- `send_prepared`: a `PreparedRequest` built by hand (method, URL, headers, body) handed straight
  to the transport adapter, skipping `Session.request`.
"""
