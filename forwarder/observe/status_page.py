"""`GET /_status`: the fleet as a page for people, refreshing itself from `/_backends`.

One self-contained HTML file (`status.html`: inline style and script, no build step, nothing
fetched from elsewhere), read once at start-up. Its Content-Security-Policy lets it reach only
this forwarder, so it works where the browser has no internet and leaks nothing to anyone.
"""

from pathlib import Path

from flask import Response

_PAGE = (Path(__file__).resolve().parent / "status.html").read_bytes()
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
    "X-Content-Type-Options": "nosniff",
}


def status_page() -> Response:
    return Response(_PAGE, content_type="text/html; charset=utf-8", headers=_HEADERS)
