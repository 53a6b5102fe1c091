"""Every setting of the forwarder, declared once: name, default, how it is read, what it means.

Settings come from environment variables. `load()` reads and validates all of them; a bad value
raises `SettingError` whose message is one line naming the variable and the value, so start-up
(`gunicorn.conf.py`) can print it and exit. The README's settings table mirrors `SETTINGS`; a
test keeps the two in step.
"""

import dataclasses
import ipaddress
import math
import os
import urllib.parse
import re
from typing import Any, Callable, Optional

from .routing import POLICIES


class SettingError(Exception):
    """A setting's value cannot be used; the message is one line for the operator."""


def _seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("must be a finite number of seconds, 0 or more")
    return number


def _positive_seconds(value: str) -> float:
    number = _seconds(value)
    if number == 0:
        raise ValueError("must be more than 0 seconds")
    return number


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ValueError("not a port number") from None
    if not 1 <= port <= 65535:
        raise ValueError("must be a port number from 1 to 65535")
    return port


def _readable_file(value: str) -> str:
    if not value:
        raise ValueError("must name a file")
    with open(value, "rb"):
        pass
    return value


def _dns_server(value: str) -> "Optional[tuple[str, int]]":
    """`ADDRESS[:PORT]` of a DNS server as (address, port); empty means the system resolver."""
    if not value:
        return None
    if value.count(":") > 1 and not value.startswith("["):
        value = f"[{value}]"  # a bare IPv6 address: every colon is part of it
    split = urllib.parse.urlsplit(f"//{value}")
    try:
        if split.path or split.query or split.fragment or split.username or split.port == 0:
            raise ValueError
        return ipaddress.ip_address(split.hostname or "").compressed, split.port or 53
    except ValueError:
        raise ValueError("must be an IP address with an optional port, "
                         "like 10.96.0.10 or 127.0.0.1:5353 or [fd00::a]:53") from None


def _model_name(value: str) -> Optional[str]:
    # Set but empty means unset: `FORCED_MODEL_NAME=` in a compose file should not force "".
    return value.strip() or None


def _byte_count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("not a whole number of bytes") from None
    if number < 1:
        raise ValueError("must be 1 byte or more")
    return number


# RFC 6750's `b64token`, the characters a Bearer token may hold.
_BEARER_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _api_key(value: str) -> Optional[str]:
    # Set but empty means unset, as for FORCED_MODEL_NAME.
    if not value:
        return None
    if not _BEARER_TOKEN.fullmatch(value):
        raise ValueError("a key may hold only letters, digits and - . _ ~ + / (then =)")
    return value


def _api_keys(value: str) -> Optional[tuple]:
    if not value:
        return None
    keys = tuple(key.strip() for key in value.split(","))
    if not all(keys):
        raise ValueError("an empty key in the comma-separated list")
    return tuple(_api_key(key) for key in keys)


def _routing_policy(value: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"must be one of {', '.join(POLICIES)}")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    default: Optional[str]
    parse: Callable[[str], Any]
    doc: str
    # A secret's value never appears in an error message (start-up output ends up in logs).
    secret: bool = False

    @property
    def attribute(self) -> str:
        return self.name.lower()


SETTINGS = (
    Setting("IP_LIST_FILE", "ip.txt", _readable_file,
            "the backend list, one entry a line; read again every poll cycle"),
    Setting("CHECK_INTERVAL_SECONDS", "10", _positive_seconds,
            "seconds between health polls; fractions allowed (`0.5`)"),
    Setting("BACKEND_DEFAULT_PORT", "8101", _port,
            "port for an `ip.txt` entry that names none"),
    Setting("FORCED_MODEL_NAME", None, _model_name,
            "when set, the `model` field of every JSON-object POST body is set to it"),
    Setting("HEALTH_TIMEOUT_SECONDS", "5", _positive_seconds,
            "a health poll that takes longer marks the backend unhealthy (`\"timeout\"`)"),
    Setting("CONNECT_TIMEOUT_SECONDS", "5", _positive_seconds,
            "time to open a connection to a backend before trying another"),
    Setting("READ_TIMEOUT_SECONDS", "600", _positive_seconds,
            "longest silence from a backend, before or between chunks, before `504` "
            "(mid-stream: an in-band error event, then the end of the stream)"),
    Setting("NO_BACKEND_WAIT_SECONDS", "0", _seconds,
            "when no backend is healthy, how long a request waits for one to come back "
            "before `503`"),
    Setting("DNS_SERVER", None, _dns_server,
            "`ADDRESS[:PORT]` of the DNS server that resolves `dns+` entries; unset: the "
            "system resolver (`/etc/resolv.conf`, `/etc/hosts`, search domains)"),
    Setting("DNS_TIMEOUT_SECONDS", "5", _positive_seconds,
            "longest wait for one `dns+` lookup; on failure that entry keeps its last addresses"),
    Setting("FORWARDER_API_KEYS", None, _api_keys,
            "comma-separated keys; when set, every `/v1/*` request needs "
            "`Authorization: Bearer <one of them>`, else `401`", secret=True),
    Setting("BACKEND_API_KEY", None, _api_key,
            "when set, sent to backends as `Authorization: Bearer <it>` in place of the client's "
            "header; when unset the client's header passes through", secret=True),
    Setting("ADMIN_API_KEY", None, _api_key,
            "when set, `/_backends`, `/_status` and `/metrics` need "
            "`Authorization: Bearer <it>`, else `401`", secret=True),
    Setting("MAX_REQUEST_BODY_BYTES", "67108864", _byte_count,
            "a larger request body gets `413` without being read whole (chunked uploads too)"),
    Setting("ROUTING_POLICY", "random", _routing_policy,
            "how a backend is chosen: `random`, `least_loaded` or `affinity` "
            "(see Choosing a routing policy)"),
    Setting("END_STREAMS_BEFORE_KILL_SECONDS", "0", _seconds,
            "after `SIGTERM`, responses still running this long before gunicorn's "
            "`graceful_timeout` runs out are ended with an answer (a stream: vLLM's in-band "
            "error, `503`, and `[DONE]`) instead of being cut by the kill; 0: they run until "
            "the kill"),
)

Settings = dataclasses.make_dataclass(
    "Settings", [(s.attribute, Any) for s in SETTINGS], frozen=True)
Settings.__doc__ = ("The validated value of every setting, as attributes named like "
                    "`check_interval_seconds`.")


def load(environ=None) -> "Settings":
    """Read every setting from `environ` (default: the process environment) and validate it."""
    environ = os.environ if environ is None else environ
    values = {}
    for setting in SETTINGS:
        raw = environ.get(setting.name, setting.default)
        if raw is None:
            values[setting.attribute] = None
            continue
        try:
            values[setting.attribute] = setting.parse(raw.strip())
        except (ValueError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            shown = "<hidden>" if setting.secret else repr(raw)
            raise SettingError(f"{setting.name}={shown}: {reason}") from None
    return Settings(**values)
