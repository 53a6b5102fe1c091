"""Model lists: what a backend's `GET /v1/models` says it serves, and the fleet's merged answer.

A backend whose list cannot be read (an error status, a body that is not vLLM's list shape)
serves "any model": it stays a candidate for every request, and vLLM itself answers a model it
lacks.
"""

import json


def read_model_list(body: "bytes | None") -> "tuple[dict, ...] | None":
    """The model entries of a `/v1/models` answer's body, each a dict with a string `id`; None
    when there is no body or it is not a readable list."""
    if body is None:
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return None
    entries = tuple(e for e in data if isinstance(e, dict) and isinstance(e.get("id"), str))
    return entries if len(entries) == len(data) else None


def merged_models_body(backends) -> "bytes | None":
    """The `/v1/models` answer for the fleet: the union of the backends' lists, one entry per id
    (the first backend's entry, in list order), in OpenAI's shape; None when no backend's list is
    known."""
    seen = set()
    data = []
    known = False
    for backend in backends:
        if backend.model_entries is None:
            continue
        known = True
        for entry in backend.model_entries:
            if entry["id"] not in seen:
                seen.add(entry["id"])
                data.append(entry)
    if not known:
        return None
    return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
