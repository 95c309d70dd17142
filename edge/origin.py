"""Which web pages may open a socket: Phoenix's ``check_origin`` (docs/protocol.md §2.5).

Browsers apply no same-origin policy to WebSockets and send the visitor's cookies with
the upgrade, so without this check any page the visitor opens could open a socket in
their name (cross-site WebSocket hijacking).  The browser names the page in ``Origin``;
both transports check it here before the user's ``connect`` runs.  Clients that are not
browsers send no ``Origin`` and are let through, as Phoenix does: the check protects
browser users, it does not authenticate anyone.

The default lets in pages from the host the request was made to; ``--allowed-origins``
replaces that with Phoenix-style entries (``https://example.com``, ``//another.com:888``,
``//*.other.com``) and ``--check-origin false`` turns the check off.
"""
from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

# Elixir's URI.default_port table: "https://example.com" means port 443 exactly.
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "sftp": 22,
                 "tftp": 69, "ldap": 389}

ENTRY_SHAPES = 'e.g. "https://example.com", "//another.com:888" or "//*.other.com"'


class OriginParts(NamedTuple):
    """Scheme, host and port of an origin, or of an allowed entry (None = any)."""
    scheme: str | None
    host: str | None
    port: int | None


def _split(text: str) -> OriginParts:
    parts = urlsplit(text.strip())
    port = parts.port                     # ValueError for a port that is not a number
    scheme = parts.scheme or None
    if port is None and scheme is not None:
        port = DEFAULT_PORTS.get(scheme)
    return OriginParts(scheme, parts.hostname, port)


def parse_allowed(text: str) -> tuple[OriginParts, ...]:
    """``--allowed-origins`` (comma-separated) -> entries; ValueError names a bad one."""
    entries = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            entry = _split(item)
        except ValueError as exc:
            raise ValueError(f"allowed origin {item.strip()!r}: {exc}") from None
        if not entry.host:
            # "example.com" without "//" parses as a path: refuse it rather than allow nothing.
            raise ValueError(f"allowed origin {item.strip()!r} has no host; {ENTRY_SHAPES}")
        entries.append(entry)
    if not entries:
        raise ValueError(f"--allowed-origins lists no origin; {ENTRY_SHAPES}")
    return tuple(entries)


def entry_matches(entry: OriginParts, origin: OriginParts) -> bool:
    """Phoenix's rule: each part the entry gives must equal the origin's; ``*.d`` is d and below."""
    if entry.scheme is not None and entry.scheme != origin.scheme:
        return False
    if entry.port is not None and entry.port != origin.port:
        return False
    host = entry.host
    if host.startswith("*."):
        base = host[2:]
        return origin.host == base or origin.host.endswith("." + base)
    return origin.host == host


class OriginCheck:
    """The edge's origin policy; ``allows`` is asked once per WebSocket upgrade or LongPoll request."""
    __slots__ = ("enabled", "allowed")

    def __init__(self, enabled: bool = True, allowed: tuple[OriginParts, ...] | None = None):
        self.enabled = enabled
        self.allowed = allowed            # None: the request's own host

    @classmethod
    def from_options(cls, check_origin: str = "true", allowed_origins: str | None = None) -> "OriginCheck":
        """From ``--check-origin`` and ``--allowed-origins``; ValueError for a contradiction."""
        if check_origin not in ("true", "false"):
            raise ValueError(f"--check-origin must be true or false, got {check_origin!r}")
        if check_origin == "false":
            if allowed_origins:
                raise ValueError("--allowed-origins has no effect with --check-origin false; "
                                 "give one or the other")
            return cls(enabled=False)
        return cls(allowed=parse_allowed(allowed_origins) if allowed_origins else None)

    def allows(self, origins: list[str], request_host: str) -> bool:
        """``origins``: every Origin header of the request (normally none or one)."""
        if not self.enabled or not origins:
            return True
        if len(origins) != 1:
            return False                  # no browser sends two; do not guess which one counts
        try:
            origin = _split(origins[0])
        except ValueError:
            return False
        if not origin.host:               # "null" (sandboxed frames, file:) names no page
            return False
        if self.allowed is None:
            # Phoenix's default compares the host only (scheme and port are not checked).
            return origin.host == request_host.lower().strip("[]")
        return any(entry_matches(entry, origin) for entry in self.allowed)

    def describe(self) -> str:
        if not self.enabled:
            return "off"
        if self.allowed is None:
            return "the request's own host"
        return ", ".join(_unsplit(e) for e in self.allowed)


def _unsplit(entry: OriginParts) -> str:
    text = f"{entry.scheme}://" if entry.scheme else "//"
    text += entry.host if ":" not in entry.host else f"[{entry.host}]"
    return text + (f":{entry.port}" if entry.port is not None else "")
