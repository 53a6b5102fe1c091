"""`random`: any candidate, uniformly (the seed's behaviour, and the default)."""

import random

from .base import Request


class RandomPolicy:
    name = "random"
    needs_session_key = False

    def __init__(self, registry):
        pass

    def pick(self, members: tuple, request: Request):
        return random.choice(members)
