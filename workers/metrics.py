"""Prometheus metrics of the workers, served by their supervisor (`zchannels workers --metrics-port`).

Each worker is its own process, so the numbers live in prometheus_client's multiprocess
mode: the supervisor makes a private directory and points PROMETHEUS_MULTIPROC_DIR at it
before it forks; every process (workers and supervisor) then writes its values to
mmapped files there, and the supervisor's /metrics sums them up when scraped.  A dead
worker's live gauge files are removed when it is reaped; its counters and histograms
stay, so totals survive restarts.

Workers record, from their own loop: channel instances (a gauge summed over live
workers, refreshed with every heartbeat), the latency of each channel callback (a
histogram labelled by callback name) and channel crashes.  The supervisor records
worker restarts.  Without --metrics-port, ``recorder`` is a no-op object and nothing
is measured.
"""
from __future__ import annotations

import os
import shutil
import tempfile

# Channel callbacks are usually well under a millisecond; the default buckets start at 5 ms.
HANDLER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Off:
    """The recorder when metrics are off."""

    def observe(self, callback: str, seconds: float) -> None:
        pass

    def crashed(self, callback: str) -> None:
        pass

    def channels(self, count: int) -> None:
        pass


recorder: "Off | WorkerRecorder" = Off()   # what workers/channels.py and runner.py call


class WorkerRecorder:
    """The metrics of one worker process (made in the child, after the fork)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram
        # registry=None: in multiprocess mode only the files matter, and no global registry
        # inherited from the supervisor gets involved.
        self.instances = Gauge("zchannels_worker_channel_instances",
                               "Channel instances running in the workers", registry=None,
                               multiprocess_mode="livesum")
        self.latency = Histogram("zchannels_worker_handler_seconds",
                                 "Time in one channel callback (join, handle_in, handle_out, handle_info)",
                                 ["callback"], buckets=HANDLER_BUCKETS, registry=None)
        self.crashes = Counter("zchannels_worker_handler_crashes",
                               "Channel callbacks that raised or returned an invalid value",
                               ["callback"], registry=None)

    def observe(self, callback: str, seconds: float) -> None:
        self.latency.labels(callback).observe(seconds)

    def crashed(self, callback: str) -> None:
        self.crashes.labels(callback).inc()

    def channels(self, count: int) -> None:
        self.instances.set(count)


def init_worker() -> None:
    """In a forked worker of a supervisor that serves metrics: start recording."""
    global recorder
    recorder = WorkerRecorder()


class SupervisorMetrics:
    """The multiprocess directory, the restart counter and the /metrics server thread.

    The server thread starts before the first fork, so children are forked from a process
    with two threads.  That is safe here because the thread holds nothing a child needs:
    it only reads the metric files (MultiProcessCollector takes no lock that workers use),
    it never logs (prometheus_client's handler is silent), CPython resets the import lock
    in the child, and the child closes the listening socket at once (``forked``) and never
    runs the thread, which does not exist in the child.
    """

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.dir = tempfile.mkdtemp(prefix="zchannels-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.dir
        from prometheus_client import (CollectorRegistry, Counter, ProcessCollector,
                                       start_http_server, values)
        from prometheus_client.multiprocess import MultiProcessCollector
        # The value class is chosen when prometheus_client is imported; choose again now that
        # the directory is set, in case something imported it earlier.
        values.ValueClass = values.get_value_class()
        self.restarts = Counter("zchannels_worker_restarts",
                                "Workers restarted after dying (crash, kill, stuck loop)",
                                registry=None)
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=self.dir)
        ProcessCollector(registry=registry)   # the supervisor's own CPU, memory, files
        try:
            self.server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.url = f"http://{host}:{self.server.server_port}/metrics"

    def forked(self) -> None:
        """In the child: let go of the listening socket (the thread is not in the child)."""
        self.server.socket.close()

    def reaped(self, pid: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead
        mark_process_dead(pid, self.dir)

    def restarted(self) -> None:
        self.restarts.inc()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)


class NoSupervisorMetrics:
    def forked(self) -> None:
        pass

    def reaped(self, pid: int) -> None:
        pass

    def restarted(self) -> None:
        pass
