"""The Flask application: the `/v1/*` proxy and the forwarder's own endpoints."""

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Rule

from . import access, telemetry
from .errors import error_response
from .proxy import Proxy
from .registry import REGISTRY, Registry
from .request_id import RequestIdMiddleware
from .status_page import status_page


def create_app(settings, registry: Registry = REGISTRY) -> Flask:
    app = Flask(__name__)
    # `/v1//models` must reach the proxy as it is, not be redirected by Werkzeug.
    app.url_map.merge_slashes = False
    # A rule without `methods` takes every method, so OPTIONS, PROPFIND or anything vLLM adds
    # later is forwarded too (Flask's own `route` would limit it to GET and answer OPTIONS itself).
    app.url_map.add(Rule("/v1/<path:subpath>", endpoint="proxy", strict_slashes=False))
    app.view_functions["proxy"] = Proxy(settings, registry)
    access.install(app, settings)

    @app.get("/_backends")
    def backends():
        return jsonify(registry.status())

    @app.get("/_health")
    def health():
        # For probes: ready once this worker has polled the fleet once. A fleet with nothing
        # healthy is still `ok`: the forwarder itself works and answers 503 in OpenAI's shape.
        figures = {"backends_healthy": len(registry.healthy),
                   "backends_total": len(registry.backends())}
        if not registry.first_cycle_done:
            return jsonify(status="starting", **figures), 503
        return jsonify(status="ok", **figures)

    app.add_url_rule("/metrics", "metrics", telemetry.Scrape(registry).response)
    app.add_url_rule("/_status", "status", status_page)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(exc.code or 500, exc.description or exc.name)

    app.wsgi_app = RequestIdMiddleware(app.wsgi_app)
    return app
