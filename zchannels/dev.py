"""`zchannels dev`: broker, one edge and a workers supervisor on this machine.

Each runs as its own process, exactly as in production; this command only
starts them in order, forwards their output, and stops them together.

The status page is on here (it is off by default on a production edge): with a
token from ``--status-token`` or env ZCHANNELS_STATUS_TOKEN, else a random one, which
is printed with the page's URL and handed to the edge through its environment (not
its command line, which other users of the machine can read).  ``--status-token off``
turns the page off.

With ``--reload`` the app's source files are watched (zchannels/reload.py) and a change
rolls the workers onto the new code.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

from bus.logsetup import setup_logging
from edge.origin import OriginCheck
from zchannels.reload import SourceWatcher, watched_root

log = logging.getLogger("dev")


def status_token_of(args) -> str | None:
    """The status page's token: --status-token, env ZCHANNELS_STATUS_TOKEN, else a fresh one;
    None for 'off'."""
    token = getattr(args, "status_token", None) or os.environ.get("ZCHANNELS_STATUS_TOKEN")
    if token == "off":
        return None
    return token or secrets.token_urlsafe(16)


def _watcher(app: str) -> SourceWatcher | None:
    root = watched_root(app)
    if root is None:
        log.warning("--reload: cannot find the source of %s; not watching", app)
        return None
    watcher = SourceWatcher(root)
    log.info("--reload: watching %d Python file(s) under %s", len(watcher.seen), root)
    return watcher


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        self.ready = threading.Event()
        self.fields: dict[str, str] = {}
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY "):
                self.fields.update(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                self.ready.set()
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main(args) -> int:
    log_format = getattr(args, "log_format", "text")
    setup_logging(args.log_level, "dev", log_format)
    try:
        OriginCheck.from_options(args.check_origin, args.allowed_origins)
    except ValueError as exc:       # checked before anything starts, not when the edge exits
        log.error("%s", exc)
        return 2
    level = ["--log-level", args.log_level, "--log-format", log_format]
    bus_limit = ["--max-bus-message", str(args.max_bus_message)]
    status_token = status_token_of(args)
    static = args.static
    app_path = Path(args.app.split(":")[0])
    if static is None and app_path.suffix == ".py" and (app_path.parent / "static").is_dir():
        static = str(app_path.parent / "static")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    # --curve-keys DIR (checked by the CLI) -> the broker's and the clients' key flags
    broker_curve, client_curve = getattr(args, "curve", None) or ([], [])
    children: list[Child] = []
    try:
        broker = Child("broker", ["broker", "--bus", args.bus, *bus_limit, *broker_curve, *level])
        children.append(broker)
        if not broker.ready.wait(10):
            log.error("broker did not start; is %s already in use?", args.bus)
            return 1
        bus = broker.fields["bus"]
        children.append(Child("workers", ["workers", "--bus", bus, "-n", str(args.workers),
                                          "--stuck-timeout", str(args.stuck_timeout), *bus_limit,
                                          *client_curve, *level,
                                          args.app]))
        edge_args = ["edge", "--bus", bus, "--host", args.host, "--port", str(args.port),
                     "--heartbeat-timeout", str(args.heartbeat_timeout),
                     "--max-frame-size", str(args.max_frame_size),
                     "--max-channels", str(args.max_channels),
                     "--max-outbound", str(args.max_outbound),
                     "--max-inbound-buffered", str(args.max_inbound_buffered),
                     "--max-rate", str(args.max_rate), "--max-burst", str(args.max_burst),
                     "--check-origin", args.check_origin,
                     "--longpoll-window", str(args.longpoll_window), *bus_limit, *client_curve, *level]
        if args.allowed_origins:
            edge_args += ["--allowed-origins", args.allowed_origins]
        if getattr(args, "compress", False):
            edge_args.append("--compress")
        if getattr(args, "api_key", None):
            edge_args += ["--api-key", args.api_key]
        if args.longpoll_inactivity is not None:
            edge_args += ["--longpoll-inactivity", str(args.longpoll_inactivity)]
        for flag in ("no_websocket", "no_longpoll"):
            if getattr(args, flag):
                edge_args.append("--" + flag.replace("_", "-"))
        if static:
            edge_args += ["--static", static]
        for flag in ("certfile", "keyfile"):
            if getattr(args, flag, None):
                edge_args += ["--" + flag, getattr(args, flag)]
        edge = Child("edge", edge_args, env={"ZCHANNELS_STATUS_TOKEN": status_token or ""})
        children.append(edge)
        if edge.ready.wait(10):
            http = edge.fields.get("http")
            log.info("zchannels dev running: open %s", http)
            if status_token:
                log.info("status page: %s/status?status_token=%s", http, status_token)
        watcher = _watcher(args.app) if getattr(args, "reload", False) else None
        workers = children[1]
        while not stopping.is_set():
            if watcher is not None and (changed := watcher.changed()):
                log.info("reloading the workers: %s changed", ", ".join(changed[:5]) +
                         (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
                workers.proc.send_signal(signal.SIGHUP)
            for child in children:
                code = child.proc.poll()
                if code is not None:
                    log.error("%s exited with code %s; stopping everything", child.name, code)
                    return 1
            stopping.wait(0.5)
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        for child in reversed(children):
            child.wait(10)
