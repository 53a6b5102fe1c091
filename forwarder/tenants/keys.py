"""The API keys: which bearer tokens open `/v1/*`, their names, and the limits each carries.

- `FORWARDER_API_KEYS`: `KEY` or `NAME:KEY` entries. `API_KEYS_FILE`: named keys with limits,
  one a line, `NAME KEY [max_concurrent=N] [requests_per_minute=N] [tokens_per_minute=N]`, read
  again every poll cycle by the list leader (a bad line is logged and skipped; an unreadable file
  keeps the last good keys) and shared with every worker through the host table.
- Names, never keys, appear in metrics, logs and `/_status`; a key without a name is `none`
  there.
- Keys are kept and compared as SHA-256 digests with `hmac.compare_digest`, against every key
  whatever the earlier ones gave, so the time an answer takes tells neither which key matched
  nor how much of a guess was right, nor a key's length.

What a key may do is in `limits.py`; who must present one, in `forwarder/access.py`.
"""

import dataclasses
import hashlib
import hmac
import logging
import re
import time

from ..host.table import Busy, HostTable, NotLeader
from ..settings import KEY_NAME
from ..watched_file import WatchedFile

log = logging.getLogger(__name__)

# A removed key's column goes to a new key only this long after, when no request of the old
# one is left and its minute's counts have expired.
KEY_QUARANTINE_SECONDS = 120.0

# The name of a key without one, in metrics, logs and pages.
NO_NAME = "none"
LIMITS = ("max_concurrent", "requests_per_minute", "tokens_per_minute")


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


@dataclasses.dataclass(frozen=True)
class Key:
    """One API key as the request path knows it: never the key itself."""

    column: int
    name: str
    max_concurrent: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0

    @property
    def label(self) -> str:
        return self.name or NO_NAME


class KeyRing:
    """Bearer tokens (as digests) and what each opens."""

    __slots__ = ("_entries",)

    def __init__(self, entries):
        self._entries = tuple(entries)  # (digest, what it opens)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def opened(self) -> tuple:
        """What each key opens, in order."""
        return tuple(opens for _, opens in self._entries)

    def admits(self, authorization: "str | None"):
        """What the `Authorization` header value's key opens, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        # WSGI hands header values over as latin-1 text; back to the bytes the client sent.
        presented = digest(token.strip().encode("latin-1", "replace"))
        matched = None
        for known, opens in self._entries:
            if hmac.compare_digest(presented, known) and matched is None:
                matched = opens
        return matched if scheme.lower() == "bearer" else None


def parse_keys_file(text: str, where: str) -> "list[tuple[str, str, dict]]":
    """(name, key, limits) of each good line of an API_KEYS_FILE; bad lines are logged (with
    their name, never their key) and skipped."""
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        name = fields[0]
        try:
            if len(fields) < 2:
                raise ValueError("no key after the name")
            if not KEY_NAME.fullmatch(name):
                raise ValueError("a name may hold only letters, digits and - _ .")
            if not re.fullmatch(r"[A-Za-z0-9\-._~+/]+=*", fields[1]):
                raise ValueError("a key may hold only letters, digits and - . _ ~ + / (then =)")
            limits = {}
            for field in fields[2:]:
                limit, equals, value = field.partition("=")
                if limit not in LIMITS or not equals or not value.isdigit():
                    raise ValueError(f"{field.split('=')[0]!r} is not one of "
                                     f"{', '.join(f'{n}=N' for n in LIMITS)}")
                limits[limit] = int(value)
        except ValueError as exc:
            log.warning("%s:%d: skipping the key named %r: %s", where, number, name[:64], exc)
            continue
        keys.append((name, fields[1], limits))
    return keys


class Keys:
    """This worker's API keys, mirrored from the host table, and their limits."""

    def __init__(self, settings, table: HostTable):
        self.table = table
        self.static = tuple((name or "", key) for name, key in settings.forwarder_api_keys or ())
        self.file = WatchedFile(settings.api_keys_file, "the API keys file") \
            if settings.api_keys_file else None
        self.required = bool(self.static or self.file)
        self.ring = KeyRing(())
        self._version = -1
        self._file_keys = []
        if self.required and not self.file:
            # Known from the start: no need to wait for the leader.
            self.ring = KeyRing((digest(key.encode()), Key(index, name))
                                for index, (name, key) in enumerate(self.static))

    def publish(self) -> None:
        """The list leader's reading of the keys (every poll cycle)."""
        if not self.required:
            return
        text = self.file.changed() if self.file else None
        if text is not None:
            self._file_keys = parse_keys_file(text, self.file.path)
        entries = [(name, digest(key.encode()), 0, 0, 0) for name, key in self.static]
        entries += [(name, digest(key.encode()), *(limits.get(n, 0) for n in LIMITS))
                    for name, key, limits in self._file_keys]
        try:
            self.table.write_keys(entries, time.time(), KEY_QUARANTINE_SECONDS)
        except ValueError as exc:
            log.error("%s; keeping the last keys", exc)
        except (Busy, NotLeader):
            pass  # another worker writes them (a new leader, while this one drains)

    def sync(self) -> None:
        """Mirror the table's keys, if they changed."""
        table = self.table
        version = table.keys_version
        if not self.required or version == self._version:
            return
        keys = table.read_keys()
        if keys is None:
            return  # the last reading stays, until the keys are repaired
        self._version = version
        for column, *_ in keys:
            table.adopt_key_column(column)
        self.ring = KeyRing((known, Key(column, name, *limits))
                            for column, name, known, *limits in keys)

    def all(self) -> "tuple[Key, ...]":
        """Every key, in order."""
        self.sync()
        return self.ring.opened()


_shared = None


def shared_keys(settings, table: HostTable) -> Keys:
    """This process's keys over `table` (the app's and the poller's)."""
    global _shared
    if _shared is None or _shared.table is not table:
        _shared = Keys(settings, table)
    return _shared


