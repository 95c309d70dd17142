"""A real phoenix.js client for the end-to-end tests, driven from Python.

`JsClient` runs `node tests/js/driver.js` (phoenix 1.8.17 over the `ws` package) and talks to it
with one JSON object per line: commands go in on stdin, answers and events come back on stdout.
Every method waits for the driver's answer with a deadline; everything the socket and its
channels observe is kept in `events`, which tests query with `wait_event`.

    c = JsClient()
    c.connect(cluster.ws_urls[0], params={"user": "ann"})
    assert c.join("a", "echo:1")["status"] == "ok"
    assert c.push("a", "ping", {"q": 1}) == {"status": "ok", "response": {"q": 1}, ...}
    c.wait_event({"type": "chan_error", "chan": "a"}, timeout=5)
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
DRIVER = ROOT / "tests" / "js" / "driver.js"
NODE = shutil.which("node") or "node"

Pred = Callable[[dict], bool] | dict


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(value: dict) -> bytes:
    """Bytes from the driver's {"binary_b64": ...} form (AssertionError for anything else)."""
    assert isinstance(value, dict) and "binary_b64" in value, f"expected a binary payload, got {value!r}"
    return base64.b64decode(value["binary_b64"])


def matches(pred: Pred, event: dict) -> bool:
    """A dict predicate matches when every key it names has that value in the event."""
    if callable(pred):
        return bool(pred(event))
    return all(event.get(k, object()) == v for k, v in pred.items())


class DriverError(AssertionError):
    pass


class JsClient:
    """One phoenix.js `Socket` in its own Node process. Thread-safe enough for one test thread."""

    def __init__(self, name: str = "js", start_timeout: float = 10.0,
                 env: dict[str, str] | None = None):
        """``env`` is added to the Node process's environment (e.g. NODE_EXTRA_CA_CERTS)."""
        self.name = name
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._answers: dict[int, dict] = {}
        self.events: list[dict] = []
        self.stdout_garbage: list[str] = []
        # The child appends to its own handle (O_APPEND) and we read through another, so reading
        # never moves the offset the child writes at.
        fd, self._stderr_path = tempfile.mkstemp(prefix=f"zch-{name}-", suffix=".stderr")
        os.close(fd)
        with open(self._stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [NODE, str(DRIVER)], cwd=str(ROOT), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=err, bufsize=0, env=None if env is None else {**os.environ, **env})
        self._reader = threading.Thread(target=self._read, name=f"jsclient-{name}", daemon=True)
        self._reader.start()
        self.wait_event({"type": "driver_ready"}, timeout=start_timeout)

    # ---- plumbing --------------------------------------------------------------------------

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                with self._cond:
                    self.stdout_garbage.append(line)
                continue
            with self._cond:
                if "id" in msg and "type" not in msg:
                    self._answers[msg["id"]] = msg
                else:
                    self.events.append(msg)
                self._cond.notify_all()
        with self._cond:
            self.events.append({"type": "driver_exit"})
            self._cond.notify_all()

    def send(self, cmd: str, wait_s: float = 10.0, **fields: Any) -> dict:
        """Send one command and return its answer; raise DriverError if it failed or did not
        answer within `wait_s` seconds. `fields` go to the driver as they are."""
        ident = next(self._ids)
        line = json.dumps({"id": ident, "cmd": cmd, **fields}) + "\n"
        if self.proc.poll() is not None:
            raise DriverError(f"{self.name}: node driver exited ({self.proc.returncode}); "
                              f"stderr:\n{self.stderr_text()}")
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + wait_s
        with self._cond:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise DriverError(
                        f"{self.name}: no answer to {cmd} {fields} within {wait_s}s; "
                        f"events so far: {self.events[-15:]}; stderr: {self.stderr_text()[-2000:]}")
                self._cond.wait(min(left, 0.2))
            answer = self._answers.pop(ident)
        if not answer.get("ok"):
            raise DriverError(f"{self.name}: {cmd} failed: {answer.get('error')}")
        answer.pop("id", None)
        answer.pop("ok", None)
        return answer

    def mark(self) -> int:
        """Current length of the event list: pass it as `since` to wait only for newer events."""
        with self._cond:
            return len(self.events)

    def wait_event(self, pred: Pred, timeout: float = 5.0, since: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events[since:]:
                    if matches(pred, ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: no event matching {pred} within {timeout}s; "
                        f"events since {since}: {self.events[since:][-25:]}")
                self._cond.wait(min(left, 0.2))

    def wait_events(self, pred: Pred, count: int, timeout: float = 5.0, since: int = 0) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [ev for ev in self.events[since:] if matches(pred, ev)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: {len(found)}/{count} events matching {pred} within {timeout}s; "
                        f"events since {since}: {self.events[since:][-25:]}")
                self._cond.wait(min(left, 0.2))

    def find(self, pred: Pred, since: int = 0) -> list[dict]:
        with self._cond:
            return [ev for ev in self.events[since:] if matches(pred, ev)]

    def messages(self, chan: str, event: str, since: int = 0) -> list[dict]:
        return self.find({"type": "message", "chan": chan, "event": event}, since)

    def wire(self, direction: str = "in", since: int = 0) -> list:
        """Raw frames seen so far (needs connect(frames=True)): text decoded as JSON, binary as bytes."""
        out = []
        for ev in self.find({"type": "frame", "dir": direction}, since):
            data = ev["data"]
            out.append(json.loads(data) if isinstance(data, str) else unb64(data))
        return out

    def driver_errors(self) -> list[dict]:
        return self.find({"type": "driver_error"})

    def stderr_text(self) -> str:
        try:
            with open(self._stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    # ---- phoenix.js operations --------------------------------------------------------------

    def connect(self, url: str, params: dict | None = None, *, wait: bool = True,
                timeout: float = 10.0, **opts: Any) -> dict:
        """`new Socket(url, opts).connect()`; waits for the first open/error/close unless wait=False.

        `url` is the socket path, e.g. ws://127.0.0.1:PORT/socket (phoenix adds /websocket).
        Extra opts pass through to phoenix's Socket (vsn, timeout, heartbeatIntervalMs, ...);
        rejoinAfterMs / reconnectAfterMs may be a number or a list; frames=True logs raw frames
        as {"type":"frame","dir":"in"|"out","data":...}; log=True forwards phoenix's logger.
        transport="longpoll" uses phoenix's LongPoll (default "websocket"); longPollFallbackMs
        passes through. LongPoll POSTs are logged as {"type":"lp_post","lines":N,"status":S}.
        """
        if not wait:
            opts["wait"] = False
        return self.send("connect", wait_s=timeout, url=url, params=params or {}, opts=opts)

    def join(self, chan: str, topic: str, params: dict | None = None, *, timeout_ms: int | None = None,
             on: list[str] = (), timeout: float = 15.0, nowait: bool = False,
             presence: bool = False) -> dict:
        """Join `topic` with a channel object named `chan`; returns {"status","response","join_ref"}.

        `on` registers listeners before the join is sent, so nothing pushed right after the join
        reply can be missed. nowait=True returns {"status": "sent"} at once (watch the "joined"
        event), e.g. to push while the join is still in flight.  presence=True attaches a
        phoenix.js `Presence`; each onSync emits {"type": "presence_sync", "chan", "list"}.
        """
        fields: dict[str, Any] = {"chan": chan, "topic": topic, "params": params or {}, "on": list(on)}
        if presence:
            fields["presence"] = True
        if nowait:
            fields["nowait"] = True
        if timeout_ms is not None:
            fields["timeout"] = timeout_ms
            timeout = max(timeout, timeout_ms / 1000 + 5)
        return self.send("join", wait_s=timeout, **fields)

    def push(self, chan: str, event: str, payload: Any = None, *, binary: bytes | None = None,
             timeout_ms: int | None = None, timeout: float | None = None, nowait: bool = False) -> dict:
        """`channel.push(event, payload)`; returns {"status": ok|error|<custom>|timeout, "response"}.

        nowait=True returns {"status": "sent"} at once (for events that never reply).
        """
        fields: dict[str, Any] = {"chan": chan, "event": event}
        if nowait:
            fields["nowait"] = True
        if binary is not None:
            fields["binary"] = b64(binary)
        elif payload is not None:
            fields["payload"] = payload
        if timeout_ms is not None:
            fields["timeout"] = timeout_ms
        if timeout is None:
            timeout = (timeout_ms or 10_000) / 1000 + 5
        return self.send("push", wait_s=timeout, **fields)

    def push_many(self, chan: str, pushes: list[tuple[str, Any]], *, timeout_ms: int | None = None,
                  timeout: float | None = None) -> list[dict]:
        """Several `channel.push`es in one event-loop tick; returns each one's
        {"status", "response"}, in order."""
        fields: dict[str, Any] = {"chan": chan, "pushes": [{"event": e, "payload": p} for e, p in pushes]}
        if timeout_ms is not None:
            fields["timeout"] = timeout_ms
        if timeout is None:
            timeout = (timeout_ms or 10_000) / 1000 + 5
        return self.send("push_many", wait_s=timeout, **fields)["results"]

    def lp_token(self, token: str | None = None) -> str | None:
        """The LongPoll session token phoenix.js holds; with `token`, the transport's later
        requests carry that token instead."""
        fields = {} if token is None else {"token": token}
        return self.send("lp_token", **fields)["token"]

    def on(self, chan: str, event: str) -> None:
        self.send("on", chan=chan, event=event)

    def leave(self, chan: str, timeout: float = 15.0) -> dict:
        return self.send("leave", wait_s=timeout, chan=chan)

    def disconnect(self, code: int | None = None, reason: str | None = None, timeout: float = 10.0) -> None:
        fields: dict[str, Any] = {}
        if code is not None:
            fields["code"] = code
        if reason is not None:
            fields["reason"] = reason
        self.send("disconnect", wait_s=timeout, **fields)

    def raw(self, frame: str | None = None, *, binary: bytes | None = None) -> None:
        """Send a frame as is through the socket's current WebSocket."""
        if binary is not None:
            self.send("raw", binary=b64(binary))
        else:
            self.send("raw", frame=frame)

    def ping(self, timeout: float = 10.0) -> dict:
        """`socket.ping()`: a heartbeat round trip; {"status": "ok", "rtt": ms}."""
        return self.send("ping", wait_s=timeout)

    def state(self) -> dict:
        return self.send("state")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()   # the driver disconnects and exits on EOF
                self.proc.wait(2)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            os.unlink(self._stderr_path)
        except OSError:
            pass

    def __enter__(self) -> "JsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<JsClient {self.name} pid={self.proc.pid}>"


def node_available() -> bool:
    return bool(shutil.which("node")) and DRIVER.is_file() and \
        (ROOT / "node_modules" / "phoenix").is_dir() and (ROOT / "node_modules" / "ws").is_dir()

