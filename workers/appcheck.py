"""Loading the handler module once before the supervisor starts, to report a broken one.

`zchannels workers` would find out anyway: its first workers fail to load the module and it
stops with exit code 2 (workers/supervisor.py).  But by then it has logged its own start and
forked N workers.  This check loads the module in a forked child that only reports back, so
a module that cannot be imported is one line (``StartupError``) before anything starts.  The
child's own output goes nowhere; its import is repeated by every worker.

Only a module that fails to load stops the start.  A child that crashes (exits while
importing) or is still importing after ``PROBE_TIMEOUT`` says nothing; the supervisor then
starts as usual and treats its workers the way it always does.
"""
from __future__ import annotations

import os
import select
import signal
import time

from zchannels.workers.loadapp import AppLoadError, describe, load_app

PROBE_TIMEOUT = 15.0   # seconds; an import slower than this is left to the workers
MESSAGE_BYTES = 4000


def app_problem(spec: str, timeout: float = PROBE_TIMEOUT) -> str:
    """Why the handler module ``spec`` cannot be loaded, as one line; "" when it loads (or
    the check could not tell)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:   # never returns
        os.close(read_end)
        _probe(spec, write_end)
    os.close(write_end)
    try:
        message = _read_all(read_end, time.monotonic() + timeout)
    finally:
        os.close(read_end)
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            os.kill(pid, signal.SIGKILL)   # safe: an unreaped child's pid cannot be reused
            os.waitpid(pid, 0)
    return message.decode("utf-8", "replace").strip()


def _probe(spec: str, reply_fd: int) -> None:
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        load_app(spec)
    except AppLoadError as exc:
        os.write(reply_fd, describe(exc).encode("utf-8", "replace")[:MESSAGE_BYTES])
        code = 1
    except BaseException:   # a crash, not a module that cannot load: the workers will tell
        code = 1
    finally:
        os._exit(code)   # never run the parent's atexit hooks or finally blocks


def _read_all(fd: int, deadline: float) -> bytes:
    chunks: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, MESSAGE_BYTES)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    return b""   # still importing: no verdict
