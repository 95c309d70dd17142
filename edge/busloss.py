"""An edge cut off from the bus for long sends its clients to edges that have it.

Clients of an edge without the bus would only see their pushes stall (the edge answers their
heartbeats itself).  After ``BUS_LOSS_TIMEOUT`` without the broker (``--bus-loss-timeout``)
they are closed with 1012 over ``BUS_LOSS_DRAIN`` seconds (edge/drain.py) and reconnect through
the load balancer; if the bus comes back meanwhile, the rest stay.  Longer than a plain broker
restart (~1-2 s of silence), which must cost no channel.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from zchannels.bus.timing import BUS_LOSS_DRAIN, BUS_LOSS_TIMEOUT
from zchannels.edge.drain import drain

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)



class BusLoss:
    def __init__(self, hub: "EdgeHub", timeout: float = BUS_LOSS_TIMEOUT):
        self.hub = hub
        self.timeout = timeout        # 0: never close clients for the bus
        self._timer: asyncio.TimerHandle | None = None

    def bus_down(self) -> None:
        """The bus went silent: close the clients once it has been silent for ``timeout``."""
        if self.timeout > 0:
            delay = max(0.0, self.timeout - self.hub.bus.silent_for())
            self._timer = asyncio.get_running_loop().call_later(delay, self._lost)

    def bus_back(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _lost(self) -> None:
        self._timer = None
        hub = self.hub
        if not hub.bus.broker_silent or not hub.connections:
            return
        log.warning("no broker for %.0fs: closing %d client connection(s) (1012) so they reconnect "
                    "to an edge that has the bus", hub.bus.silent_for(), len(hub.connections))
        asyncio.get_running_loop().create_task(self._close_clients())

    async def _close_clients(self) -> None:
        hub = self.hub
        hub.stats["bus_loss_closes"] += await drain(
            hub, BUS_LOSS_DRAIN, "bus unreachable", stop=lambda: not hub.bus.broker_silent)
