"""The backend list (`ip.txt`): what each entry means, and reading the file.

An entry is `host`, `host:port`, `[v6]:port`, a bare IPv6 address, or an `http(s)://` URL whose
trailing `/v1` is dropped. Each becomes a base URL: health is `GET {base}/metrics`, the API is
`{base}/v1/...`. A `dns+NAME:PORT` entry becomes a `DnsName`, which stands for every address
`NAME` resolves to (`forwarder.discovery` expands it every poll cycle). A line that cannot be
understood is logged with file and line number and skipped; the others still load.
"""

import dataclasses
import ipaddress
import logging
import re
import urllib.parse

log = logging.getLogger(__name__)

# RFC 1123 host names, plus `_` which Docker and Kubernetes service names may contain.
_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*\.?")


DNS_PREFIX = "dns+"


@dataclasses.dataclass(frozen=True)
class DnsName:
    """A `dns+NAME:PORT` entry: one backend `http://ADDRESS:PORT` per address of `name`."""

    name: str
    port: int

    @property
    def source(self) -> str:
        """The entry as `/_backends` shows it for each backend it stands for."""
        return f"{DNS_PREFIX}{self.name}:{self.port}"

    @classmethod
    def from_source(cls, source: str) -> "DnsName | None":
        """The entry a `source` names, or None when it names none."""
        name, _, port = source.removeprefix(DNS_PREFIX).rpartition(":")
        return cls(name, int(port)) if source.startswith(DNS_PREFIX) and port.isdigit() else None


def url_host(host: str) -> str:
    """The host as it is written inside a URL, or ValueError."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise ValueError(f"bad host {host!r}") from None
        return host.lower()
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def _port(split: urllib.parse.SplitResult) -> "int | None":
    try:
        port = split.port
    except ValueError:
        raise ValueError("bad port") from None
    if port == 0:
        raise ValueError("bad port")
    return port


def _dns_name(entry: str, default_port: int) -> DnsName:
    split = urllib.parse.urlsplit(f"//{entry}")
    if split.path or split.query or split.fragment or split.username or not split.hostname:
        raise ValueError("dns+ takes NAME:PORT only")
    try:
        ipaddress.ip_address(split.hostname)
    except ValueError:
        return DnsName(url_host(split.hostname), _port(split) or default_port)
    raise ValueError("dns+ takes a host name, not an address")


def parse_entry(entry: str, default_port: int) -> "str | DnsName":
    """The base URL an `ip.txt` entry stands for, or the `DnsName` of a `dns+` entry;
    ValueError says why it cannot be understood."""
    if any(c.isspace() for c in entry):
        raise ValueError("spaces inside the entry")
    if not (entry.isascii() and entry.isprintable()):
        # A URL path would carry them on to every request; host names are ASCII (`xn--` for IDN).
        raise ValueError("non-ASCII or control characters in the entry")
    if entry[:len(DNS_PREFIX)].lower() == DNS_PREFIX:
        return _dns_name(entry[len(DNS_PREFIX):], default_port)
    if "://" in entry:
        split = urllib.parse.urlsplit(entry)
        if split.scheme.lower() not in ("http", "https"):
            raise ValueError(f"bad scheme {split.scheme!r}, only http and https")
        if split.query or split.fragment or split.username or split.password:
            raise ValueError("a backend URL takes no query, fragment or user")
        port = _port(split)
        path = split.path.rstrip("/")
        if path.endswith("/v1"):
            path = path[:-3].rstrip("/")
        scheme = split.scheme.lower()
    else:
        if entry.count(":") > 1 and not entry.startswith("["):
            entry = f"[{entry}]"  # a bare IPv6 address: every colon is part of it
        split = urllib.parse.urlsplit(f"//{entry}")
        if split.path or split.query or split.fragment or split.username:
            raise ValueError("only host or host:port without a scheme")
        port = _port(split) or default_port
        path = ""
        scheme = "http"
    if not split.hostname:
        raise ValueError("no host")
    host = url_host(split.hostname)
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def parse_backend_list(text: str, filename: str, default_port: int) -> "list[str | DnsName]":
    """The distinct entries of a backend list (base URLs and `DnsName`s), in file order; bad
    lines are logged and skipped."""
    parsed = {}
    for number, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        try:
            parsed.setdefault(parse_entry(entry, default_port), None)
        except ValueError as exc:
            log.warning("%s:%d: skipping backend entry %r: %s", filename, number, entry, exc)
    return list(parsed)
