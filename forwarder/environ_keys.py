"""The WSGI environ keys through which the forwarder's parts pass one request's facts along.

The app writes them while it handles a request; the edge of the app (`app.py`) and the access
log (`access_log.py`), which gunicorn calls once the response has ended, read them. Operators
may name them in their own `--access-logformat` (`%({forwarder.backend}e)s`), so their values
do not change.
"""

# The request's id (`request_id.py`).
REQUEST_ID = "forwarder.request_id"
# The base URL of the backend the request was last sent to.
BACKEND = "forwarder.backend"
# Seconds to the first byte of the backend's body, formatted for the log.
TTFB = "forwarder.ttfb"
# Why a response ended before its backend's body did (`backend_error`, `backend_timeout`,
# `client_left`, `shutdown`); absent when it ended whole.
CUT = "forwarder.cut"
# Set when the connection ends after this answer: it then says `Connection: close`.
CLOSE_CONNECTION = "forwarder.close_connection"
# The API key the request came with (`tenants.keys.Key`), when keys are set.
API_KEY = "forwarder.key"
# The request's model and the tokens its answer used, as the access log shows them.
MODEL = "forwarder.model"
PROMPT_TOKENS = "forwarder.prompt_tokens"
COMPLETION_TOKENS = "forwarder.completion_tokens"
# How many times the answer went on on another backend (`relay/resume.py`).
RESUMED = "forwarder.resumed"
# gunicorn's `start_response`, for a write outside the response body's iteration (SSE keep-alive).
START_RESPONSE = "forwarder.start_response"
