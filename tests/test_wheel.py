"""The built wheel, installed into a fresh virtualenv in an empty folder: `zchannels dev` serves the
chat example it carries, with phoenix.js, WebSocket, LongPoll and the status page, and nothing
of the checkout (no node_modules, no source tree) on its path."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.jsclient import JsClient

pytestmark = pytest.mark.skipif(os.environ.get("ZCH_SKIP_WHEEL") == "1", reason="ZCH_SKIP_WHEEL=1")


def run(cmd: list[str], cwd: Path, timeout: float) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd}: {result.stdout[-2000:]}{result.stderr[-3000:]}"
    return result.stdout


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A virtualenv with only the built wheel (and its dependencies) installed."""
    base = tmp_path_factory.mktemp("wheel")
    run(["bash", "scripts/build", str(base / "dist")], ROOT, 300)
    wheel = next((base / "dist").glob("zchannels-*.whl"))
    run([sys.executable, "-m", "venv", str(base / "venv")], base, 120)
    run([str(base / "venv/bin/python"), "-m", "pip", "install", "-q", str(wheel)], base, 600)
    return base / "venv"


@pytest.mark.timeout(900)
def test_the_wheel_installs_only_zchannels_and_knows_its_version(installed):
    site = Path(run([str(installed / "bin/python"), "-c", "import zchannels, os; print(os.path.dirname("
                     "os.path.dirname(zchannels.__file__)))"], installed.parent, 30).strip())
    ours = {p.name for p in site.iterdir() if p.name.startswith(("zchannels", "broker", "bus", "edge",
                                                                  "workers"))}
    assert ours <= {"zchannels", *[p.name for p in site.glob("zchannels-*.dist-info")]}, ours
    out = run([str(installed / "bin/zchannels"), "--version"], installed.parent, 30)
    assert re.fullmatch(r"zchannels \d+\.\d+\.\d+\S*\n", out), out


@pytest.mark.timeout(900)
def test_zchannels_dev_from_the_wheel_serves_the_chat_with_phoenix_js_longpoll_and_status(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dev = subprocess.Popen([str(installed / "bin/zchannels"), "dev", "--port", "0", "--bus", "tcp://127.0.0.1:0",
                            "-n", "1"], cwd=empty, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    client = JsClient()
    try:
        http = status_url = None
        lines = []
        for line in dev.stderr:
            lines.append(line)
            if m := re.search(r"zchannels dev running: open (http://\S+)", line):
                http = m.group(1)
            if m := re.search(r"status page: (http://\S+)", line):
                status_url = m.group(1)
            if http and status_url:
                break
        assert http and status_url, "".join(lines)[-3000:]
        status, page = get(http + "/")
        assert status == 200 and b"phoenix" in page.lower()
        status, js = get(http + "/js/phoenix.js")
        assert status == 200 and b"Socket" in js
        status, html = get(status_url)
        assert status == 200 and b"zchannels" in html
        ws = http.replace("http://", "ws://") + "/socket"
        client.connect(ws, params={"user": "ann"})
        assert client.join("lobby", "room:lobby", {})["status"] == "ok"
        client.push("lobby", "new_msg", {"body": "from the wheel"})
        client.wait_event({"type": "message", "chan": "lobby", "event": "new_msg"}, timeout=5)
        poller = JsClient("lp")
        try:
            poller.connect(http + "/socket", params={"user": "bob"}, transport="longpoll")
            assert poller.join("lobby", "room:lobby", {})["status"] == "ok"
            client.push("lobby", "new_msg", {"body": "to the poller"})
            poller.wait_event({"type": "message", "chan": "lobby", "event": "new_msg"}, timeout=10)
        finally:
            poller.close()
    finally:
        client.close()
        dev.terminate()
        try:
            dev.wait(20)
        except subprocess.TimeoutExpired:
            dev.kill()
    assert dev.returncode == 0
