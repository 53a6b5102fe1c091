"""The load of a backend: the one formula that `least_loaded`, `affinity`'s bound and the brake's
choice among backends with room all weigh.

    load = max(0, running + waiting − counted) + weight in flight / WEIGHT_UNITS
           + KV_FULL_PENALTY × max(0, kv − KV_NEARLY_FULL) / (1 − KV_NEARLY_FULL)

`running` and `waiting` are the backend's scraped `num_requests_*`, `counted` the instance's
requests in flight to it when they were scraped (already in those figures), `weight in flight`
the weight of the instance's requests in flight to it now, all workers together (`weight_of`: 1 +
body bytes / REQUEST_WEIGHT_BYTES per request until its first token, the prefill that grows with
the prompt; 1 after), and `kv` its scraped KV-cache use: a cache past 90 % counts up to 16
requests more, so a backend about to preempt is avoided while another has room. Because each
pick raises the chosen backend's figure at once, a burst between two polls spreads request by
request instead of piling onto the backend that looked idlest at the last poll.
"""

# A request's weight is counted in sixteenths, so that it stays an integer in the host table.
WEIGHT_UNITS = 16
# A KV cache this full is about to preempt and recompute: avoided while another has room.
KV_NEARLY_FULL = 0.9
# Past KV_NEARLY_FULL a backend counts up to this many requests busier (at a full cache).
KV_FULL_PENALTY = 16.0


def weight_of(body_length: int, bytes_per_request: int) -> int:
    """A request's weight, in WEIGHT_UNITS per request, from its body's length in bytes (1 for
    every request when `bytes_per_request` is 0): a 100,000-token prompt, ~400 KB, weighs about
    100 with the default 4096; a 10-token one, 1."""
    if not bytes_per_request:
        return WEIGHT_UNITS
    return WEIGHT_UNITS + body_length * WEIGHT_UNITS // bytes_per_request


def load(backend) -> float:
    """Requests queued at or running on the backend, in requests of weight 1, as far as the
    instance knows (see the module docstring)."""
    scraped = (backend.num_requests_running or 0) + (backend.num_requests_waiting or 0)
    pressure = max(0.0, (backend.kv_cache_usage or 0.0) - KV_NEARLY_FULL) / (1 - KV_NEARLY_FULL)
    return (max(0, scraped - backend.in_flight_at_poll) + backend.in_flight_weight / WEIGHT_UNITS
            + KV_FULL_PENALTY * pressure)
