"""What a key may use: `max_concurrent` requests at once, `requests_per_minute` and
`tokens_per_minute`, held per instance, all workers together (the host table's key planes).

`take` counts a request of a key in, or refuses it (`Rejected`, `429` with `Retry-After`);
`give_back` frees the request's place and counts its outcome and tokens. The request's ledger
(`relay/ledger.py`) calls each once. A minute is a sliding window: this minute's count plus the
last one's in the share of the minute not yet passed, so at a minute's end one request more than
the limit may pass.
"""

import math
import time

from ..errors import Rejected
from ..host.layout import KeyCount
from ..host.table import HostTable
from ..observe import metrics


class KeyLimits:
    """The key limits of one instance, over its host table."""

    def __init__(self, table: HostTable, clock=time.time):
        self.table = table
        self.clock = clock

    def take(self, key) -> None:
        """Count a request of `key` (`tenants.keys.Key`) in, or refuse it when it is over a
        limit."""
        table, column, now = self.table, key.column, self.clock()
        if key.max_concurrent and table.key_sum(KeyCount.IN_FLIGHT, column) >= key.max_concurrent:
            _refuse("key_max_concurrent", 1)
        retry = max(1, math.ceil(60 - now % 60))
        if key.requests_per_minute and table.per_minute(KeyCount.REQUESTS_NOW, column, now) \
                >= key.requests_per_minute:
            _refuse("key_requests_per_minute", retry)
        if key.tokens_per_minute and table.per_minute(KeyCount.TOKENS_NOW, column, now) \
                >= key.tokens_per_minute:
            _refuse("key_tokens_per_minute", retry)
        table.add_key(KeyCount.IN_FLIGHT, column, 1)
        table.count_per_minute(KeyCount.REQUESTS_NOW, column, 1, now)

    def give_back(self, key, failed: bool, tokens: int) -> None:
        """A request of `key` is over: its place is free, its outcome and tokens counted."""
        table, column = self.table, key.column
        table.add_key(KeyCount.IN_FLIGHT, column, -1)
        table.add_key(KeyCount.REQUESTS, column, 1)
        table.add_key(KeyCount.ERRORS, column, int(failed))
        if tokens:
            table.add_key(KeyCount.TOKENS, column, tokens)
            table.count_per_minute(KeyCount.TOKENS_NOW, column, tokens, self.clock())


def _refuse(reason: str, retry_after: int):
    metrics.rejected(reason)
    raise Rejected(reason, retry_after)
