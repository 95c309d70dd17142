"""Who may hold an unfinished HTTP connection on this edge, and for how many descriptors.

A connection is *pending* while the edge waits for a client's request: from accept until its
request headers and body have been read, and again while a keep-alive connection waits for
its next request.  A WebSocket upgrade stays pending until it is answered or handed over
(its ``connect`` runs in a worker first), then leaves the count for good.  A LongPoll poll
the edge holds open is not pending: the client has done its part.
Pending connections are what slowloris attacks pile up, so they are capped:

- ``--max-pending-per-peer`` (64) per socket peer address: one address cannot hold more.
  Trusted proxies (``--trusted-proxies``) are exempt, as every client behind them shares
  their address; they still count toward the global cap.
- ``--max-pending`` (2,000) for the whole edge.  Past it, an address with no pending
  connection of its own still gets one in, up to an eighth more: a slowloris spread over many
  addresses fills the cap, and a client that opens one connection and sends its request (the
  well-behaved kind) is still served.

A connection over a cap is refused right at accept (``edge/accept.py``): the edge writes a
bare ``503`` and closes it, counts it, and logs at most one line a second per reason.

**Descriptors.**  At start the edge raises its soft ``RLIMIT_NOFILE`` to the hard limit
(``raise_nofile_limit``).  Near the limit it keeps a reserve of ``reserve_size`` descriptors
(64, or 1/16 of the limit when that is smaller) for well-behaved clients and ``/metrics``:
Linux hands out the lowest free descriptor, so the number of a freshly accepted socket is a
lower bound on the descriptors in use; once it falls within the reserve, a new connection is
admitted only when its peer has no other pending connection, and only while fewer than half
the reserve are pending connections admitted that way.  A client that opens one connection
and sends its request (a browser's upgrade, a Prometheus scrape) still gets in; a peer
hoarding connections does not.  The number is a lower bound only: when descriptors are freed
out of order the edge may notice the shortage late, and the acceptor's pause on ``EMFILE``
(``edge/accept.py``) is the backstop.

**Request bodies in flight.**  ``reserve_body`` / ``release_body`` count the request-body
bytes the edge holds for all requests together against ``--max-body-inflight``; the gate in
``edge/httplimits.py`` reserves a body when it starts to arrive and the bytes are released
when its answer has been sent (the next request on the connection starts) or it closes.

Nothing here touches the hot path of an established connection: the counts change at accept,
at the end of each request read, and at close.
"""
from __future__ import annotations

import logging
import resource
import time

from zchannels.edge.forwarded import TrustedProxies

log = logging.getLogger("edge")

RESERVE_MAX = 64
NOFILE_FALLBACK_CAP = 1 << 20     # when the hard limit is "unlimited"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log the result once; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, NOFILE_FALLBACK_CAP)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open files limit raised from %d to %d (the hard limit)", soft, target)
            return target
        except (ValueError, OSError) as exc:
            log.warning("open files limit stays %d: raising it to %d failed: %s", soft, target, exc)
            return soft
    log.info("open files limit: %d", soft)
    return soft


def nofile_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return NOFILE_FALLBACK_CAP if soft == resource.RLIM_INFINITY else soft


class Refusals:
    """Counts refusals in the edge's stats dict and logs at most one line a second per kind."""

    def __init__(self, stats: dict, kinds: tuple[str, ...]):
        self.stats = stats
        for kind in kinds:
            stats.setdefault(kind, 0)
        self._last_log: dict[str, float] = {}

    def __call__(self, kind: str, fmt: str, *args) -> None:
        self.stats[kind] = n = self.stats.get(kind, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(kind, -1.0) >= 1.0:
            self._last_log[kind] = now
            log.info(fmt + " (%d %s so far)", *args, n, kind.replace("_", " "))


class Slot:
    """One accepted HTTP connection, from accept to close."""

    __slots__ = ("ip", "label", "trusted", "pending", "in_reserve", "requests", "body_reserved",
                 "request")

    def __init__(self, ip: str, port: int, trusted: bool):
        self.ip = ip
        self.label = f"{ip}:{port}"
        self.trusted = trusted
        self.pending = False
        self.in_reserve = False      # admitted from the descriptor reserve
        self.requests = 0            # requests whose headers were read on this connection
        self.body_reserved = 0       # request-body bytes counted against --max-body-inflight
        self.request = None          # the RequestGate of the request being read (httplimits)


class Admission:
    """Pending-connection caps, the descriptor reserve, and the request-body bytes in flight."""

    KINDS = ("pending_peer_refusals", "pending_total_refusals", "descriptor_reserve_refusals")

    def __init__(self, max_pending: int, max_pending_per_peer: int, max_body_inflight: int,
                 trusted: TrustedProxies, refusals: Refusals, fd_limit: int | None = None):
        self.max_pending = max_pending
        self.max_pending_per_peer = max_pending_per_peer
        self.max_body_inflight = max_body_inflight
        self.trusted = trusted
        self.refused = refusals
        limit = fd_limit if fd_limit is not None else nofile_limit()
        self.reserve_size = max(2, min(RESERVE_MAX, limit // 16))
        self.reserve_from = limit - self.reserve_size   # descriptor numbers at or above: reserve
        self.pending_total = 0
        self.overflow = max(16, max_pending // 8)   # past max_pending, for addresses with none pending
        self.pending_by_peer: dict[str, int] = {}
        self.pending_in_reserve = 0
        self.body_inflight = 0

    # --- accept -----------------------------------------------------------------------------
    def admit(self, ip: str, port: int, fd: int) -> Slot | None:
        """A Slot for a new connection, already pending; None (counted, logged) if refused."""
        peer_pending = self.pending_by_peer.get(ip, 0)
        trusted = self.trusted.trusts(ip)
        if self.pending_total >= self.max_pending and (
                peer_pending > 0 or self.pending_total >= self.max_pending + self.overflow):
            self.refused("pending_total_refusals",
                         "refused %s:%d at accept: %d connections already wait for their request "
                         "(--max-pending)", ip, port, self.pending_total)
            return None
        if not trusted and peer_pending >= self.max_pending_per_peer:
            self.refused("pending_peer_refusals",
                         "refused %s:%d at accept: %d connections from this address already wait "
                         "for their request (--max-pending-per-peer)", ip, port, peer_pending)
            return None
        in_reserve = fd >= self.reserve_from
        if in_reserve and (peer_pending > 0 or self.pending_in_reserve * 2 >= self.reserve_size):
            self.refused("descriptor_reserve_refusals",
                         "refused %s:%d at accept: descriptor %d is within the last %d before the "
                         "limit, kept for clients with no other pending connection", ip, port, fd,
                         self.reserve_size)
            return None
        slot = Slot(ip, port, trusted)
        slot.in_reserve = in_reserve
        self._set_pending(slot, True)
        return slot

    # --- the life of a connection -------------------------------------------------------------
    def request_started(self, slot: Slot) -> None:
        """The edge waits for (another) request on this connection; the last one is answered."""
        self.release_body(slot)
        if not slot.pending:
            self._set_pending(slot, True)

    def request_read(self, slot: Slot) -> None:
        """Headers and body are in (or the connection is handed over): no longer pending."""
        if slot.pending:
            self._set_pending(slot, False)

    def closed(self, slot: Slot) -> None:
        self.release_body(slot)
        self.request_read(slot)

    def _set_pending(self, slot: Slot, pending: bool) -> None:
        step = 1 if pending else -1
        slot.pending = pending
        self.pending_total += step
        n = self.pending_by_peer.get(slot.ip, 0) + step
        if n > 0:
            self.pending_by_peer[slot.ip] = n
        else:
            self.pending_by_peer.pop(slot.ip, None)
        if slot.in_reserve:
            self.pending_in_reserve += step
            if not pending:
                slot.in_reserve = False   # a keep-alive request later is an ordinary one

    # --- request bodies in flight --------------------------------------------------------------
    def reserve_body(self, slot: Slot, nbytes: int) -> bool:
        """Count ``nbytes`` more of this connection's request body; False if over the cap."""
        if self.body_inflight + nbytes > self.max_body_inflight:
            return False
        self.body_inflight += nbytes
        slot.body_reserved += nbytes
        return True

    def release_body(self, slot: Slot) -> None:
        self.body_inflight -= slot.body_reserved
        slot.body_reserved = 0
