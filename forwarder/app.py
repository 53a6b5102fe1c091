"""The Flask application: the `/v1/*` proxy and the forwarder's own endpoints, behind one WSGI
edge that gives every request its id and ends the connections that must end."""

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

from . import access, environ_keys
from .compat.server import close_connection
from .errors import error_response
from .fleet import registry as fleet
from .fleet.registry import Registry
from .observe import metrics, status_history
from .observe.request_id import HEADER as REQUEST_ID_HEADER, request_id
from .observe.status_page import status_page
from .relay.proxy import Proxy
from .tenants.keys import shared_keys


def create_app(settings, registry: "Registry | None" = None) -> Flask:
    registry = registry if registry is not None else fleet.shared()
    app = Flask(__name__)
    # `/v1//models` must reach the proxy as it is, not be redirected by Werkzeug.
    app.url_map.merge_slashes = False
    # A rule without `methods` takes every method, so OPTIONS, PROPFIND or anything vLLM adds
    # later is forwarded too (Flask's own `route` would limit it to GET and answer OPTIONS itself).
    app.url_map.add(Rule("/v1/<path:subpath>", endpoint="proxy", strict_slashes=False))
    keys = shared_keys(settings, registry.table)
    app.view_functions["proxy"] = Proxy(settings, registry, keys)
    access.install(app, settings, keys, registry)

    @app.get("/_backends")
    def backends():
        return jsonify(registry.status())

    @app.get("/_health")
    def health():
        # For probes: ready once every listed backend has been polled. A fleet with nothing
        # healthy is still `ok`: the forwarder itself works and answers 503 in OpenAI's shape.
        registry.sync()
        figures = {"backends_healthy": len(registry.healthy),
                   "backends_total": len(registry.backends())}
        if not registry.first_cycle_done:
            return jsonify(status="starting", **figures), 503
        return jsonify(status="ok", **figures)

    app.add_url_rule("/metrics", "metrics", metrics.Scrape(registry).response)
    app.add_url_rule("/_status", "status", status_page)
    recorder = status_history.shared(registry, keys)

    @app.get("/_status/data")
    def status_data():
        return jsonify(recorder.document())

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)

    app.wsgi_app = Edge(app.wsgi_app)
    return app


class Edge:
    """WSGI middleware around the whole app: gives each request its id (`X-Request-Id` on every
    answer) and makes an answer after which the connection ends say `Connection: close`."""

    __slots__ = ("app",)

    def __init__(self, app):
        self.app = app

    def __call__(self, environ, start_response):
        rid = environ[environ_keys.REQUEST_ID] = request_id(environ)
        environ[environ_keys.START_RESPONSE] = start_response

        def start_response_at_edge(status, headers, exc_info=None):
            headers.append((REQUEST_ID_HEADER, rid))
            if environ_keys.CLOSE_CONNECTION in environ:
                close_connection(start_response)
            return start_response(status, headers, exc_info)

        return self.app(environ, start_response_at_edge)
