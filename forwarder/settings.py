"""Every setting of the forwarder, declared once: name, default, type, validation and a line of docs.

Settings come from environment variables. Each is one field of `Settings`, declared with
`_setting(NAME, default, parse, doc)`: the field's annotation is its type, `parse` turns the
variable's text into it or raises `ValueError` with the reason. `load()` reads and validates every
one; a bad value raises `SettingError`, one line naming the variable and the value, so start-up
(`gunicorn.conf.py`) can print it and exit. `current()` is the one load of a process. The
README's settings table mirrors `SETTINGS`; a test keeps the two in step.
"""

import dataclasses
import ipaddress
import math
import os
import re
import urllib.parse
from typing import Callable, Optional

# The values of ROUTING_POLICY; `routing.py` has one policy for each.
ROUTING_POLICIES = ("random", "least_loaded", "affinity")


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
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a number of seconds") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError("must be a finite number of seconds, more than 0")
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


# A key's name, as metrics, logs and /_status show it.
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _api_keys(value: str) -> "Optional[tuple[tuple[Optional[str], str], ...]]":
    """`KEY` or `NAME:KEY` entries, comma-separated, as (name or None, key) pairs."""
    if not value:
        return None
    entries = tuple(entry.strip() for entry in value.split(","))
    if not all(entries):
        raise ValueError("an empty key in the comma-separated list")
    keys = []
    for entry in entries:
        name, colon, key = entry.rpartition(":")
        if colon and not KEY_NAME.fullmatch(name):
            raise ValueError("a key's name may hold only letters, digits and - _ . "
                             "(64 at most)")
        keys.append((name or None, _api_key(key)))
    return tuple(keys)


def _optional_readable_file(value: str) -> Optional[str]:
    return _readable_file(value) if value else None


def _switch(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0 (true or false, on or off)")


def _count(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError("not a whole number") from None
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _routing_policy(value: str) -> str:
    if value not in ROUTING_POLICIES:
        raise ValueError(f"must be one of {', '.join(ROUTING_POLICIES)}")
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one environment variable is read: its name, default text, parser and doc line."""

    name: str
    default: Optional[str]
    parse: Callable[[str], object]
    doc: str
    # A secret's value never appears in an error message (start-up output ends up in logs).
    secret: bool = False


def _setting(name: str, default: Optional[str], parse: Callable[[str], object], doc: str,
             secret: bool = False):
    """A `Settings` field read from the environment variable `name`."""
    return dataclasses.field(metadata={"setting": Setting(name, default, parse, doc, secret)})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated value of every setting, as attributes named like the variable in lower case
    (`CHECK_INTERVAL_SECONDS` is `check_interval_seconds`)."""

    ip_list_file: str = _setting(
        "IP_LIST_FILE", "ip.txt", _readable_file,
        "the backend list, one entry a line; read again every poll cycle")
    check_interval_seconds: float = _setting(
        "CHECK_INTERVAL_SECONDS", "10", _positive_seconds,
        "seconds between health polls; fractions allowed (`0.5`)")
    backend_default_port: int = _setting(
        "BACKEND_DEFAULT_PORT", "8101", _port,
        "port for an `ip.txt` entry that names none")
    forced_model_name: Optional[str] = _setting(
        "FORCED_MODEL_NAME", None, _model_name,
        "when set, the `model` field of every JSON-object POST body is set to it")
    health_timeout_seconds: float = _setting(
        "HEALTH_TIMEOUT_SECONDS", "5", _positive_seconds,
        "a health poll that takes longer marks the backend unhealthy (`\"timeout\"`)")
    connect_timeout_seconds: float = _setting(
        "CONNECT_TIMEOUT_SECONDS", "5", _positive_seconds,
        "time to open a connection to a backend before trying another")
    read_timeout_seconds: float = _setting(
        "READ_TIMEOUT_SECONDS", "600", _positive_seconds,
        "longest silence from a backend, before or between chunks, before `504` "
        "(mid-stream: an in-band error event, then the end of the stream)")
    no_backend_wait_seconds: float = _setting(
        "NO_BACKEND_WAIT_SECONDS", "0", _seconds,
        "when no healthy backend serves a request's model, how long it waits for one to come "
        "back before `503` (or `502`, when the ones it tried failed)")
    dns_server: "Optional[tuple[str, int]]" = _setting(
        "DNS_SERVER", None, _dns_server,
        "`ADDRESS[:PORT]` of the DNS server that resolves `dns+` entries; unset: the "
        "system resolver (`/etc/resolv.conf`, `/etc/hosts`, search domains)")
    dns_timeout_seconds: float = _setting(
        "DNS_TIMEOUT_SECONDS", "5", _positive_seconds,
        "longest wait for one `dns+` lookup; on failure that entry keeps its last addresses")
    forwarder_api_keys: "Optional[tuple[tuple[Optional[str], str], ...]]" = _setting(
        "FORWARDER_API_KEYS", None, _api_keys,
        "comma-separated keys, each `KEY` or `NAME:KEY`; when set, every `/v1/*` request needs "
        "`Authorization: Bearer <one of them>`, else `401`", secret=True)
    api_keys_file: Optional[str] = _setting(
        "API_KEYS_FILE", None, _optional_readable_file,
        "a file of named keys with their limits, one a line (see [Keys and their "
        "limits](docs/tenants.md#keys-and-their-limits)), read again every poll cycle; when "
        "set, every `/v1/*` request needs one of its keys or of `FORWARDER_API_KEYS`")
    backend_api_key: Optional[str] = _setting(
        "BACKEND_API_KEY", None, _api_key,
        "when set, sent to backends as `Authorization: Bearer <it>` in place of the client's "
        "header; when unset the client's header passes through", secret=True)
    admin_api_key: Optional[str] = _setting(
        "ADMIN_API_KEY", None, _api_key,
        "when set, `/_backends`, `/_status` (and its `/_status/data`) and `/metrics` need "
        "`Authorization: Bearer <it>`, else `401`", secret=True)
    max_request_body_bytes: int = _setting(
        "MAX_REQUEST_BODY_BYTES", "67108864", _byte_count,
        "a larger request body gets `413` without being read whole (chunked uploads too)")
    routing_policy: str = _setting(
        "ROUTING_POLICY", "random", _routing_policy,
        "how a backend is chosen: `random`, `least_loaded` or `affinity` "
        "(see [Routing](docs/routing.md))")
    request_weight_bytes: int = _setting(
        "REQUEST_WEIGHT_BYTES", "4096", _count,
        "until its first token a request weighs 1 + its body's length / this many bytes in the "
        "load of `least_loaded` and `affinity` (see [Policies](docs/routing.md#policies)); 0: "
        "every request weighs 1")
    max_in_flight_per_backend: int = _setting(
        "MAX_IN_FLIGHT_PER_BACKEND", "0", _count,
        "the most requests one instance has in flight to one backend, all workers together; "
        "past it a request waits in the instance's queue for the first backend that frees up "
        "(see [Load control](docs/load-control.md)); 0: no limit")
    max_queued_requests: int = _setting(
        "MAX_QUEUED_REQUESTS", "1000", _count,
        "requests waiting in that queue, per instance; one more gets `429` at once")
    queue_timeout_seconds: float = _setting(
        "QUEUE_TIMEOUT_SECONDS", "30", _positive_seconds,
        "the longest wait in the queue; then `429`")
    queue_target_seconds: float = _setting(
        "QUEUE_TARGET_SECONDS", "1", _positive_seconds,
        "once the queue has not emptied for this long, every request in it that has waited "
        "this long gets `429` at once, until the queue empties again")
    eject_after_failures: int = _setting(
        "EJECT_AFTER_FAILURES", "5", _count,
        "a backend whose requests fail this many times in a row is taken out of rotation "
        "although its `/metrics` answers; 0: never")
    eject_seconds: float = _setting(
        "EJECT_SECONDS", "30", _positive_seconds,
        "how long an ejection lasts; doubled each time the same backend is ejected again soon "
        "after its return, up to 10 minutes")
    resume_streams: bool = _setting(
        "RESUME_STREAMS", "true", _switch,
        "continue a chat or completions stream whose backend breaks off on another backend, and "
        "ask a whole answer again whose backend breaks off before the client got a byte (see "
        "[Streams that survive their "
        "backend](docs/failure-modes.md#streams-that-survive-their-backend)); `false`: vLLM's "
        "in-band error at once")
    max_resumes: int = _setting(
        "MAX_RESUMES", "2", _count,
        "the most continuations (or askings again) of one answer, each on a backend it has not "
        "used yet")
    sse_keepalive_seconds: float = _setting(
        "SSE_KEEPALIVE_SECONDS", "15", _seconds,
        "while an event stream is silent this long, the forwarder sends an SSE comment "
        "(`: keep-alive`), so that load balancers' idle timeouts do not cut it; 0: off")
    meter_tokens: bool = _setting(
        "METER_TOKENS", "1", _switch,
        "read each answer's token usage, per key and model (see [Tokens and "
        "tenants](docs/tenants.md)); 0: off")
    end_streams_before_kill_seconds: float = _setting(
        "END_STREAMS_BEFORE_KILL_SECONDS", "0", _seconds,
        "after `SIGTERM`, responses still running this long before gunicorn's "
        "`graceful_timeout` runs out are ended with an answer (a stream: vLLM's in-band "
        "error, `503`, and `[DONE]`) instead of being cut by the kill; 0: they run until "
        "the kill")

    @property
    def first_cycle_wait(self) -> float:
        """The longest a worker that has just started waits for its first poll cycle: one
        lookup's and one poll's timeout, what that cycle takes when nothing answers (its polls
        start at once, up to the poller's concurrency)."""
        return self.health_timeout_seconds + self.dns_timeout_seconds


SETTINGS = tuple(field.metadata["setting"] for field in dataclasses.fields(Settings))
_ATTRIBUTES = tuple((field.name, field.metadata["setting"])
                    for field in dataclasses.fields(Settings))


def load(environ=None) -> Settings:
    """Read every setting from `environ` (default: the process environment) and validate it."""
    environ = os.environ if environ is None else environ
    values = {}
    for attribute, setting in _ATTRIBUTES:
        raw = environ.get(setting.name, setting.default)
        if raw is None:
            values[attribute] = None
            continue
        try:
            values[attribute] = setting.parse(raw.strip())
        except (ValueError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            shown = "<hidden>" if setting.secret else repr(raw)
            raise SettingError(f"{setting.name}={shown}: {reason}") from None
    return Settings(**values)


def markdown_table() -> str:
    """The README's settings table, generated from the declarations."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for setting in SETTINGS:
        default = "unset" if setting.default is None else f"`{setting.default}`"
        rows.append(f"| `{setting.name}` | {default} | {setting.doc} |")
    return "\n".join(rows)


_current: Optional[Settings] = None


def current(reload: bool = False) -> Settings:
    """This process's settings, loaded on first use (or again, with `reload`). gunicorn's master
    loads them before it forks (and again on `SIGHUP`), so a worker inherits them loaded."""
    global _current
    if _current is None or reload:
        _current = load()
    return _current
