"""`least_loaded`: the candidate with the least load (`fleet.load`), ties broken at random.

Two random choices, the usual remedy for figures up to a poll old, measured worse here: each pick
raises the chosen backend's figure at once (the instance's in-flight weight, shared by every
worker), so a burst spreads request by request anyway (`bench/fleet_sim.py`).
"""

import random

from ...fleet.load import load
from .base import Request


def least_loaded(members: tuple):
    """The candidate with the least load; `min` keeps the first of equals, so starting at a random
    place breaks ties at random."""
    start = random.randrange(len(members))
    return min(members[start:] + members[:start], key=load)


class LeastLoaded:
    name = "least_loaded"
    needs_session_key = False

    def __init__(self, registry):
        pass

    def pick(self, members: tuple, request: Request):
        return least_loaded(members)
