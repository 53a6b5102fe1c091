"""JSON request bodies: a body read as a JSON object when something needs what it says, and a
changed one written again."""

import json


def json_object(body: bytes) -> "dict | None":
    """The body parsed, when it is a JSON object; None otherwise (the backend will say what is
    wrong with it). Read as vLLM's server reads it (`json.loads` of the bytes, UTF-16 and UTF-32
    included), so that no body the backend takes for an object escapes the model rewrite."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON after all, or nested too deep: the backend will say what is wrong
    return document if isinstance(document, dict) else None


def encoded(document: dict, model: "str | None" = None) -> bytes:
    """`document`, with its `model` field set when `model` is given, encoded."""
    if model is not None:
        document["model"] = model
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        # A lone surrogate (`"\\ud800"`) has no UTF-8 form: keep it escaped, as it came.
        return json.dumps(document, separators=(",", ":")).encode()
