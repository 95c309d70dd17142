"""Which client a request comes from: the socket peer, or what a trusted proxy says it is.

Phoenix reports the socket peer in ``connect_info.peer_data`` and the scheme the request
arrived with.  Behind nginx or a load balancer that peer is the proxy, which names the real
client in ``X-Real-Ip`` / ``X-Forwarded-For`` and the original scheme in ``X-Forwarded-Proto``
/ ``X-Scheme``.  Anybody can send those headers, so the edge believes them only from peers
in ``--trusted-proxies`` (CIDR networks, empty by default): from anyone else they are
ignored, and ``connect_info`` shows the socket peer.

From a trusted peer: ``X-Real-Ip`` if it is a valid address (the proxy writes it from its own
socket peer), else the right-most ``X-Forwarded-For`` entry that is not itself a trusted
proxy (entries to its left were written by the client and prove nothing); the scheme is the
last ``X-Forwarded-Proto`` / ``X-Scheme`` entry when it is ``http`` or ``https``.
"""
from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str | None) -> list[Network]:
    """``"10.0.0.0/8, 127.0.0.1"`` -> networks; ValueError naming the bad entry."""
    networks = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or a CIDR network "
                             f"(e.g. 10.0.0.0/8, 127.0.0.1/32, ::1)") from None
    return networks


def _address(text: str):
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        return None


class TrustedProxies:
    """The networks whose forwarding headers the edge believes."""

    def __init__(self, networks: Iterable[Network] = ()):
        self.networks = tuple(networks)

    @classmethod
    def parse(cls, text: str | None) -> "TrustedProxies":
        return cls(parse_networks(text))

    def __bool__(self) -> bool:
        return bool(self.networks)

    def describe(self) -> str:
        return ", ".join(map(str, self.networks)) or "none"

    def trusts(self, ip: str) -> bool:
        """Is this socket peer (or forwarded hop) one of the trusted proxies?"""
        if not self.networks:
            return False
        addr = _address(ip)
        if addr is None:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

    def client(self, peer_ip: str, scheme: str, headers) -> tuple[str, str]:
        """(client address, scheme) of a request whose socket peer is trusted."""
        ip = peer_ip
        real = headers.get("X-Real-Ip")
        if real and _address(real) is not None:
            ip = real.strip()
        else:
            hops = [h.strip() for h in headers.get("X-Forwarded-For", "").split(",") if h.strip()]
            for hop in reversed(hops):
                if _address(hop) is None:
                    break            # garbage: stop believing the chain here
                ip = hop
                if not self.trusts(hop):
                    break
        proto = headers.get("X-Scheme") or headers.get("X-Forwarded-Proto")
        if proto:
            proto = proto.split(",")[-1].strip().lower()
            if proto in ("http", "https"):
                scheme = proto
        return ip, scheme
