"""How fast one connection may send: a token bucket per connection (``--max-rate``,
``--max-burst``), checked by ``Connection.handle`` for every inbound message.

A phoenix.js client sends a heartbeat every 30 s and a few messages per user action, and
every join or push it sends costs a worker a turn of its mailbox; a client sending
hundreds of messages a second is broken or hostile, and would take worker time from
everyone else.  A message over the limit gets a Phoenix error reply
``{"reason":"rate limited"}`` (the client sees ``receive("error")``, and a refused join is
retried by phoenix.js with its backoff); heartbeats and leaves always pass and take no
token, so a throttled client is never closed for a heartbeat it could not send, and can
always free what it holds.  WebSocket pings and pongs take a token too (a ping flood costs
the edge as much as a message flood); one over the limit is refused by going unanswered.
A client that keeps going anyway, more than ``MAX_REFUSED`` refusals within
``REFUSED_WINDOW`` seconds, is closed with 1008 (policy violation).
"""
from __future__ import annotations

MAX_REFUSED = 100         # refused messages within REFUSED_WINDOW that close the connection
REFUSED_WINDOW = 5.0      # seconds
CLOSE_POLICY_VIOLATION = 1008
RATE_LIMITED = b'{"reason":"rate limited"}'


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one message takes one."""
    __slots__ = ("rate", "burst", "tokens", "stamp", "refused", "refused_since")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now
        self.refused = 0
        self.refused_since = now - REFUSED_WINDOW - 1.0

    def take(self, now: float) -> bool:
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def refuse(self, now: float) -> tuple[bool, bool]:
        """Count a refused message: (first refusal of a new window, connection must close)."""
        first = now - self.refused_since > REFUSED_WINDOW
        if first:
            self.refused_since = now
            self.refused = 0
        self.refused += 1
        return first, self.refused > MAX_REFUSED


def bucket_for(rate: float, burst: int, now: float) -> TokenBucket | None:
    """The bucket of a new connection; None when ``--max-rate`` or ``--max-burst`` is 0 (no limit)."""
    if rate <= 0 or burst <= 0:
        return None
    return TokenBucket(rate, burst, now)
