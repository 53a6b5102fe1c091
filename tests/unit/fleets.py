"""Registries of made-up backends for unit tests: a real `Registry` over a table of this process
alone, filled the way the poller and the list leader fill it."""

import json

from forwarder.fleet.registry import Registry


def publish(registry: Registry, urls) -> Registry:
    """`registry` listing `urls`, none of them polled yet."""
    registry.publish_list(list(urls), {}, "test list")
    return registry


def poll(registry: Registry, backend, healthy=True, **figures) -> None:
    """A poll of `backend`: healthy or not, with load figures (`num_requests_running` …)."""
    registry.record_poll(backend, healthy, reason=None if healthy else "connection refused",
                         figures=figures)


def serve(registry: Registry, backend, *models) -> None:
    """`backend`'s `/v1/models` lists `models`."""
    body = json.dumps({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
    registry.write_models(backend, body.encode())


def fleet(count: int, registry: "Registry | None" = None) -> Registry:
    """`count` healthy, idle backends `http://10.0.0.N:8101`."""
    registry = publish(registry or Registry(), [f"http://10.0.0.{i}:8101" for i in range(count)])
    for backend in registry.backends():
        poll(registry, backend, num_requests_running=0, num_requests_waiting=0)
    return registry
