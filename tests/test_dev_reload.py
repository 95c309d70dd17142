"""`zchannels dev --reload`: editing a handler file rolls the workers onto the new code, and a
connected phoenix.js client, rejoined by itself, sees the new behaviour."""
from __future__ import annotations

import re
import time

import pytest

from tests.conftest import Proc
from tests.jsclient import JsClient
from zchannels.reload import SourceWatcher, watched_root

HANDLER = '''
from zchannels.workers import Channel, Socket, ok, reply

socket = Socket()


class Versioned(Channel):
    def join(self, topic, payload, socket):
        return ok()

    def handle_in(self, event, payload, socket):
        return reply("ok", {"version": VERSION})


socket.channel("versioned:*", Versioned)
'''


def write_app(path, version: str) -> None:
    path.write_text(f"VERSION = {version!r}\n" + HANDLER)


@pytest.mark.timeout(90)
def test_an_edited_handler_reaches_a_connected_client_after_its_rejoin(tmp_path):
    app = tmp_path / "app.py"
    write_app(app, "one")
    proc = Proc("zchannels", "dev", "--reload", "--bus", "tcp://127.0.0.1:0", "--port", "0", "-n", "2",
                "--status-token", "off", str(app), name="dev")
    client = JsClient()
    try:
        line = proc.wait_for(lambda: next((l for l in proc.lines if l.startswith("[edge] READY")), None),
                             20, "the edge's READY line")
        http = dict(kv.split("=", 1) for kv in line.split()[2:])["http"]
        proc.wait_for(lambda: "--reload: watching" in proc.stderr_text(), 10, "the watcher")
        proc.wait_for(lambda: sum(l.startswith("[workers] READY") for l in proc.lines) >= 2, 20, "2 workers")
        client.connect(http.replace("http://", "ws://") + "/socket")
        assert client.join("a", "versioned:1")["status"] == "ok"
        assert client.push("a", "which", {})["response"] == {"version": "one"}, proc.stderr_text()[-3000:]

        write_app(app, "two, edited")
        proc.wait_for(lambda: re.search(r"reloading the workers: app\.py changed", proc.stderr_text()),
                      10, "the reload")
        # phoenix.js rejoins after the phx_error of each replaced worker; once both workers
        # are replaced every rejoin lands on new code.
        deadline = time.monotonic() + 40
        seen = None
        while time.monotonic() < deadline:
            try:
                seen = client.push("a", "which", {}, timeout_ms=1000)["response"]
            except AssertionError:       # between a phx_error and the rejoin
                seen = None
            if seen == {"version": "two, edited"}:
                break
            time.sleep(0.2)
        assert seen == {"version": "two, edited"}
        assert client.wait_event({"type": "chan_error", "chan": "a"}, timeout=1)   # it did rejoin
        assert "Traceback" not in proc.stderr_text()
    finally:
        client.close()
        assert proc.stop(15) == 0
        proc.cleanup()


def test_the_watcher_sees_edits_additions_and_removals_and_skips_caches(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "app.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "helpers.py").write_text("y = 1\n")
    (tmp_path / "__pycache__").mkdir()
    assert watched_root(str(tmp_path / "app.py")) == tmp_path.resolve()
    assert watched_root(str(tmp_path / "app.py") + ":socket") == tmp_path.resolve()
    watcher = SourceWatcher(tmp_path.resolve())
    assert watcher.changed() == []
    (tmp_path / "app.py").write_text("x = 22\n")
    (tmp_path / "pkg" / "new.py").write_text("z = 1\n")
    (tmp_path / "__pycache__" / "app.cpython.py").write_text("ignored")
    (tmp_path / "notes.txt").write_text("ignored")
    assert watcher.changed() == ["app.py", "pkg/new.py"]
    (tmp_path / "pkg" / "helpers.py").unlink()
    assert watcher.changed() == ["pkg/helpers.py"]
    assert watcher.changed() == []
    assert watched_root("no_such_module_anywhere.channels") is None
    assert watched_root(str(tmp_path / "missing.py")) is None
