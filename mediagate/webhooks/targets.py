"""Which addresses a webhook may be sent to: a guard against the service being used to
reach what only it can reach (cloud metadata at 169.254.169.254, the cluster's own
private network, loopback services).

A URL is checked at registration and again before every attempt: its host is resolved
once, every address it resolves to must be allowed, and the attempt then connects to
the address that was checked (never resolving again, so a name that changes its answer
in between cannot redirect it). Public (globally routable) addresses are allowed;
private, loopback, link-local, shared, reserved, multicast and unspecified ones only
inside a network the operator listed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DNS_TIMEOUT_S = 5.0


class TargetRefused(Exception):
    """The URL may not be used as a webhook target; the message says why."""


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart."""

    url: str
    scheme: str
    host: str  # a name, or an address without brackets
    port: int
    path: str  # path and query, at least "/"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == default else f"{shown}:{self.port}"

    def url_at(self, address: IpAddress) -> str:
        """The URL with its host replaced by ``address`` (the one checked)."""
        shown = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{shown}:{self.port}{self.path}"


def parse_target(url: str) -> Target:
    """``url`` as a target, or ``TargetRefused``: http(s) only, a host, no credentials."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as error:
        raise TargetRefused(f"not a valid URL: {error}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise TargetRefused("the URL must start with https:// (or http://)")
    if parts.username is not None or parts.password is not None:
        raise TargetRefused("the URL must not carry credentials; sign-ins use the signature")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise TargetRefused("the URL has no host")
    try:  # an internationalised name is sent (Host header, TLS) in its ASCII form
        host = host.encode("idna").decode("ascii") if literal_address(host) is None else host
    except UnicodeError:
        raise TargetRefused("the URL's host is not a valid domain name") from None
    if parts.fragment:
        raise TargetRefused("the URL must not have a #fragment")
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return Target(
        url=url.strip(),
        scheme=scheme,
        host=host,
        port=port or (443 if scheme == "https" else 80),
        path=path,
    )


# IPv6 ranges that carry an IPv4 address inside (NAT64, 6to4, Teredo, IPv4-compatible,
# SIIT) or are deprecated site-local: through a translator they reach IPv4 hosts,
# private ones included, yet Python calls several of them global. Never public here.
EMBEDS_IPV4 = tuple(
    ipaddress.IPv6Network(network)
    for network in (
        "64:ff9b::/96",
        "64:ff9b:1::/48",
        "2002::/16",
        "2001::/32",
        "::/96",
        "::ffff:0:0:0/96",
        "fec0::/10",
    )
)


def refusal(address: IpAddress, allowed: tuple[IpNetwork, ...]) -> str | None:
    """Why ``address`` may not be contacted, or ``None`` if it may. The reason names the
    kind of address, never the address (a refusal must not tell a caller what an
    internal name resolves to)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_unspecified or address.is_multicast:
        return "it is not a host address"
    if any(address in network for network in allowed):
        return None
    if isinstance(address, ipaddress.IPv6Address) and any(
        address in network for network in EMBEDS_IPV4
    ):
        return "it is an IPv6 address that leads to an IPv4 one, which webhooks may not use"
    if address.is_global:
        return None
    kind = (
        "loopback"
        if address.is_loopback
        else "link-local"
        if address.is_link_local
        else "private"
        if address.is_private
        else "reserved"
    )
    return f"it is (or resolves to) a {kind} address, which webhooks may not reach here"


def allowed_networks(networks: tuple[str, ...]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(network, strict=False) for network in networks)


def literal_address(host: str) -> IpAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


async def resolve(target: Target, allowed: tuple[IpNetwork, ...]) -> IpAddress:
    """The address to connect to: the host's, once, all of whose addresses are allowed;
    else ``TargetRefused`` (also when the name does not resolve)."""
    literal = literal_address(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.wait_for(
                asyncio.to_thread(
                    socket.getaddrinfo, target.host, target.port, type=socket.SOCK_STREAM
                ),
                DNS_TIMEOUT_S,
            )
        except (OSError, TimeoutError, UnicodeError):
            raise TargetRefused(f"the host {target.host} does not resolve") from None
        addresses = list(
            dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
        )
        if not addresses:
            raise TargetRefused(f"the host {target.host} does not resolve")
    for address in addresses:
        reason = refusal(address, allowed)
        if reason is not None:
            raise TargetRefused(reason)
    return addresses[0]
