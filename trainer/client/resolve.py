"""Name resolution for `dns:///host:port` endpoints: one connection per replica address.

A headless Kubernetes Service answers a DNS query with the address of every ready
replica. The client resolves such a name itself (instead of leaving it to gRPC, whose
channel would connect to one address and keep that connection for the whole run), opens
one connection to each address, balances requests across them, and resolves again every
`resolve_interval_s`: replicas the autoscaler adds get load at the next resolution,
replicas that left DNS stop getting new requests and are closed once their requests
are answered.

Other targets ("host:port", "ipv4:...", "unix:...") stay one endpoint each and gRPC
resolves them as usual.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# host -> its addresses (IPv4 or IPv6 literals, in the resolver's order). Blocking is
# fine: the client calls it on a worker thread.
Resolver = Callable[[str], Sequence[str]]

_DNS_TARGET = re.compile(r"dns:(?://(?P<authority>[^/]*)/)?(?P<rest>.*)")


def getaddrinfo_resolver(host: str) -> list[str]:
    """Every address the system resolver gives for `host` (A and AAAA), duplicates removed.

    Raises OSError (socket.gaierror) when the name does not resolve.
    """
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    # sockaddr[0] is the address for both families; dict keeps the resolver's order.
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class DnsTarget:
    """A `dns:///host:port` endpoint: the name to resolve and the port of every replica."""

    host: str
    port: int

    @property
    def authority(self) -> str:
        """'host:port', the name the replicas answer to (HTTP/2 :authority, TLS name)."""
        return f"{self.host}:{self.port}"

    def address_target(self, address: str) -> str:
        """The gRPC target of one resolved address: 'a.b.c.d:port' or '[v6]:port'."""
        literal = ipaddress.ip_address(address)  # ValueError when the resolver returns junk
        if literal.version == 6:
            return f"[{literal.compressed}]:{self.port}"
        return f"{literal.compressed}:{self.port}"


def parse_dns_target(target: str) -> DnsTarget | None:
    """The DnsTarget of 'dns:///host:port' (or 'dns:host:port'); None for other targets.

    Raises ValueError naming the endpoint when it is a dns: target the client cannot
    resolve itself: a DNS server in the authority, or no port.
    """
    match = _DNS_TARGET.fullmatch(target)
    if match is None:
        return None
    if match.group("authority"):
        raise ValueError(
            f"ClientConfig.endpoints: {target!r} names a DNS server; only dns:///host:port "
            "(the system resolver) is supported"
        )
    rest = match.group("rest")
    host, sep, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(
            f"ClientConfig.endpoints: {target!r} must be dns:///host:port with a port in [1, 65535]"
        )
    return DnsTarget(host, int(port))
