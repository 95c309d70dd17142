"""Accepting TCP connections without spinning when the process is out of file descriptors.

Tornado's accept handler raises on EMFILE and the event loop calls it again at once while
the connection waits in the backlog: a full core and a traceback per try.  Here the edge
logs once, stops accepting for a moment (as Phoenix's acceptor does) and tries again; the
waiting clients are served as soon as descriptors are free.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import socket

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

log = logging.getLogger(__name__)

ACCEPTS_PER_WAKEUP = 128
PAUSE_WHEN_FULL = 0.1   # seconds
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    def __init__(self, server: HTTPServer, sock: socket.socket):
        self.server = server
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.refused = 0
        sock.setblocking(False)

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def stop(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, address = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_FILES:
                    log.error("accept failed: %s", exc)
                    return
                self.refused += 1
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning("out of file descriptors (%s): not accepting for %.1fs (%d times "
                                "so far)", exc.strerror, PAUSE_WHEN_FULL, self.refused)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(PAUSE_WHEN_FULL, self.start)
                return
            conn.setblocking(False)
            stream = IOStream(conn, max_buffer_size=self.server.max_buffer_size,
                              read_chunk_size=self.server.read_chunk_size)
            self.server.handle_stream(stream, address)
