"""The routing policies, one file each behind one protocol (`base.Policy`), and the one the
`ROUTING_POLICY` setting names.

Candidates are the healthy backends that serve the request's model (`FleetView.serving`), not
tried yet for this request and, with the brake on, with room; a policy only chooses among them.
"""

from ...settings import ROUTING_POLICIES
from .affinity import Affinity
from .base import Policy, Request
from .least_loaded import LeastLoaded
from .random import RandomPolicy

POLICIES = {policy.name: policy for policy in (RandomPolicy, LeastLoaded, Affinity)}
assert tuple(POLICIES) == ROUTING_POLICIES, "settings.ROUTING_POLICIES names every policy"

__all__ = ("POLICIES", "Policy", "Request", "make_policy")


def make_policy(name: str, registry) -> Policy:
    """The policy `name` (a value of ROUTING_POLICY) over one worker's registry."""
    return POLICIES[name](registry)
