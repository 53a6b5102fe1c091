"""Choosing the backend for one request among the healthy ones."""

import random


def pick_backend(healthy, tried=()):
    """A random healthy backend not tried yet for this request, or None."""
    candidates = [b for b in healthy if b not in tried] if tried else healthy
    return random.choice(candidates) if candidates else None
