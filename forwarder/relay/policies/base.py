"""What every routing policy is: a class that picks one backend among the candidates for one
request, and says what it needs to know of the request.

A policy gets only candidates that may take the request (healthy, serving its model, not tried
yet, with room under the brake): it chooses, it never filters. What a policy needs of the request
is declared, so the view reads no more of a request than some policy needs (`needs_session_key`:
the body is parsed for the session key only for a policy that says so).
"""

import dataclasses
from typing import ClassVar, Protocol

from ...fleet.load import WEIGHT_UNITS


@dataclasses.dataclass(frozen=True)
class Request:
    """What a policy may know of one request: its session key (when the policy needs it) and its
    weight (`fleet.load.weight_of`)."""

    session_key: "str | None" = None
    weight: int = WEIGHT_UNITS


class Policy(Protocol):
    """One `ROUTING_POLICY`."""

    # The value of ROUTING_POLICY that names it.
    name: ClassVar[str]
    # Whether `pick` reads `Request.session_key`.
    needs_session_key: ClassVar[bool]

    def pick(self, members: tuple, request: Request):
        """One of `members` (two or more candidate `fleet.registry.Backend`s) for `request`."""
