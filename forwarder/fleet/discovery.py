"""Discovery: the backends that the `dns+NAME:PORT` entries of the list stand for, every cycle.

Each poll cycle every `dns+` entry is looked up again, all of them at once, each bounded by
`DNS_TIMEOUT_SECONDS` and cooperative: a slow or silent DNS server holds up the poller's cycle,
never a relayed request. A name that does not exist, or has no address, stands for no backend (a
headless Service scaled to zero); any other failure (timeout, SERVFAIL, no server reachable)
keeps the addresses the entry had last and is logged once, until it resolves again.

Without `DNS_SERVER`, names go through the system resolver (`getaddrinfo`, which gevent runs off
the hub): `/etc/hosts`, `/etc/resolv.conf` and its search domains apply, as for every host name in
`ip.txt`. With `DNS_SERVER`, A and AAAA questions for the name as written go to that server
(dnspython, over gevent's sockets).
"""

import ipaddress
import logging
import socket

import dns.exception
import dns.resolver
import gevent
import gevent.pool

from .backend_list import DnsName, url_host

log = logging.getLogger(__name__)

# getaddrinfo's answers that a name has no address, as opposed to "could not find out".
_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


class LookupFailed(Exception):
    """The name's addresses cannot be known now; the message says why."""


class SystemResolver:
    """The system's own resolution, as every other host name of the list gets."""

    def addresses(self, name: str) -> "list[str]":
        try:
            found = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                return []
            raise LookupFailed(exc.strerror or str(exc)) from None
        return [info[4][0] for info in found]


class ServerResolver:
    """A and AAAA questions to one DNS server, `DNS_SERVER`."""

    def __init__(self, address: str, port: int, timeout: float):
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.port = port  # before `nameservers`, which takes the port when set
        self.resolver.nameservers = [address]
        self.resolver.lifetime = timeout

    def addresses(self, name: str) -> "list[str]":
        found = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = self.resolver.resolve(name, rdtype, raise_on_no_answer=False)
            except dns.resolver.NXDOMAIN:
                return []
            except dns.exception.DNSException as exc:
                raise LookupFailed(str(exc) or type(exc).__name__) from None
            found += [record.address for record in answer]
        return found


class Discovery:
    """Expands the entries of the backend list into base URLs, re-resolving `dns+` entries."""

    def __init__(self, settings):
        self.timeout = settings.dns_timeout_seconds
        if settings.dns_server is None:
            self.resolver = SystemResolver()
        else:
            self.resolver = ServerResolver(*settings.dns_server, self.timeout)
        # The base URLs each `dns+` entry stood for after its last successful lookup.
        self.known: "dict[DnsName, list[str]]" = {}
        # The entries whose lookups fail: each failure is logged once, until a lookup works again.
        self.failing: "set[DnsName]" = set()

    def remember(self, backends) -> None:
        """Take the addresses of the `dns+` entries from `backends` as they are listed now (a new
        list leader), so that a failed lookup keeps them as it would have kept its own."""
        listed = {}
        for backend in backends:
            name = DnsName.from_source(backend.source) if backend.source else None
            if name is not None:
                listed.setdefault(name, []).append(backend.url)
        for name, urls in listed.items():
            self.known.setdefault(name, urls)

    def expand(self, entries: "list[str | DnsName]") -> "tuple[list[str], dict[str, str]]":
        """The distinct base URLs the entries stand for, in list order, and the `dns+` source of
        each URL that was discovered (a URL also listed directly keeps its first entry's)."""
        names = [entry for entry in entries if isinstance(entry, DnsName)]
        found = gevent.pool.Group().map(self._look_up, names)
        self.known = {name: self.known.get(name, []) if urls is None else urls
                      for name, urls in zip(names, found)}
        self.failing.intersection_update(self.known)
        urls, sources = {}, {}
        for entry in entries:
            if not isinstance(entry, DnsName):
                urls.setdefault(entry, None)
                continue
            for url in self.known[entry]:
                if url not in urls:
                    urls[url] = None
                    sources[url] = entry.source
        return list(urls), sources

    def _look_up(self, name: DnsName) -> "list[str] | None":
        """The base URLs `name` resolves to now, sorted; None when the lookup failed."""
        try:
            # A Timeout is no Exception, so no resolver's error handling can swallow it.
            with gevent.Timeout(self.timeout):
                addresses = self.resolver.addresses(name.name)
        except (LookupFailed, gevent.Timeout) as exc:
            if name not in self.failing:
                self.failing.add(name)
                reason = exc if isinstance(exc, LookupFailed) else f"no answer in {exc.seconds:g} s"
                log.warning("%s: DNS lookup failed (%s); keeping its last %d backends",
                            name.source, reason, len(self.known.get(name, ())))
            return None
        if name in self.failing:
            self.failing.discard(name)
            log.info("%s: DNS lookup works again", name.source)
        ordered = sorted({ipaddress.ip_address(a) for a in addresses}, key=lambda a: (a.version, a))
        urls = [f"http://{url_host(str(address))}:{name.port}" for address in ordered]
        if urls != self.known.get(name):
            log.info("%s: %d backends: %s", name.source, len(urls), " ".join(urls) or "none")
        return urls
