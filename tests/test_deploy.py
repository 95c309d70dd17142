"""The deployment recipes in deploy/ (docs/deploy.md), checked the way they are used.

- The systemd units pass `systemd-analyze verify`, installed as docs/deploy.md says with the
  install prefix /opt/zchannels replaced by a folder of the test's (verify needs the
  ExecStart binary to exist), and their ExecStart lines, expanded as systemd expands them,
  are command lines `zchannels` accepts.
- deploy/Procfile runs under honcho: broker, edge and workers with the chat example; a
  phoenix.js client joins and gets a reply and a broadcast; SIGTERM to honcho stops all three
  with exit code 0.

(deploy/nginx.conf is run by tests/test_e2e_nginx.py.)
"""
from __future__ import annotations

import importlib.util
import os
import random
import re
import shlex
import shutil
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc
from zchannels.cli import build_parser

DEPLOY = ROOT / "deploy"
UNITS = {"zchannels-broker.service": "zchannels-broker.service",
         "zchannels-edge@.service": "zchannels-edge@4001.service",   # the template, as an instance
         "zchannels-workers.service": "zchannels-workers.service"}
PREFIX = "/opt/zchannels"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian package systemd; scripts/test installs it in CI)")


def install_units(tmp: Path, extra: dict[str, str] | None = None) -> Path:
    """The units in tmp/units with PREFIX pointing at tmp/prefix, where a stand-in zchannels
    executable and the app folder exist; ``extra`` adds lines to the named unit's [Service]."""
    prefix = tmp / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    (prefix / "app").mkdir(exist_ok=True)
    stub = prefix / "venv" / "bin" / "zchannels"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    units = tmp / "units"
    units.mkdir(exist_ok=True)
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text().replace(PREFIX, str(prefix))
        if extra and name in extra:
            text = text.replace("[Service]\n", f"[Service]\n{extra[name]}\n", 1)
        (units / name).write_text(text)
    return units


def verify(units: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SYSTEMD_ANALYZE, "verify", *(str(units / i) for i in UNITS.values())],
                          capture_output=True, text=True, timeout=60)


def complaints(run: subprocess.CompletedProcess) -> list[str]:
    """What verify said about our units (a host's own broken units may add lines of theirs)."""
    return [line for line in (run.stdout + run.stderr).splitlines() if "zchannels" in line]


@needs_systemd_analyze
@pytest.mark.timeout(60)
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path):
    run = verify(install_units(tmp_path))
    assert run.returncode == 0 and not complaints(run), run.stdout + run.stderr


@needs_systemd_analyze
@pytest.mark.timeout(60)
def test_systemd_analyze_verify_catches_what_it_should(tmp_path):
    """The check checks: a misspelt setting is reported, a missing ExecStart binary fails."""
    run = verify(install_units(tmp_path / "typo", {"zchannels-workers.service": "Restrat=always"}))
    assert any("Restrat" in line for line in complaints(run)), run.stdout + run.stderr
    units = install_units(tmp_path / "missing")
    (tmp_path / "missing" / "prefix" / "venv" / "bin" / "zchannels").unlink()
    run = verify(units)
    assert run.returncode != 0 and any("not executable" in line for line in complaints(run))


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", ";", "[")):
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def exec_start_argv(name: str, instance: str = "4001") -> list[str]:
    """The unit's ExecStart as systemd runs it with its default Environment=: %i is the
    instance, ${VAR} one word, $VAR split at whitespace (no word when empty)."""
    settings = unit_settings((DEPLOY / "systemd" / name).read_text())
    env: dict[str, str] = {}
    for line in settings.get("Environment", []):
        env.update(item.split("=", 1) for item in shlex.split(line))
    [command] = settings["ExecStart"]
    argv: list[str] = []
    for word in shlex.split(command.replace("%i", instance)):
        whole = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if whole:
            argv += env[whole.group(1)].split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return argv


@pytest.mark.parametrize("name", list(UNITS))
def test_each_units_command_line_is_one_zchannels_accepts(name):
    argv = exec_start_argv(name)
    assert argv[0] == f"{PREFIX}/venv/bin/zchannels"
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"zchannels refuses the ExecStart of {name}: {argv}")
    assert args.bus == "tcp://127.0.0.1:5570"
    if args.command == "edge":
        assert args.port == 4001 and args.drain_period > 0
    if args.command in ("broker", "workers"):
        assert args.metrics_port is not None


# --- the Procfile ---------------------------------------------------------------------------------

def free_bus_port() -> int:
    """A port P with P, P+1 and P+2 free (the broker binds all three)."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for port in (base, base + 1, base + 2):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no three free ports in a row")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(importlib.util.find_spec("honcho") is None,
                    reason="honcho is not installed (pip install -e .[test])")
@pytest.mark.timeout(90)
def test_the_procfile_runs_the_chat_example_under_honcho_and_stops_cleanly(js_client):
    bus, edge_port = f"tcp://127.0.0.1:{free_bus_port()}", free_port()
    venv_bin = str(Path(sys.executable).parent)
    honcho = Proc("honcho", "-f", "deploy/Procfile", "-d", str(ROOT), "start", name="honcho",
                  env={"BUS": bus, "EDGE_PORT": str(edge_port), "WORKERS": "1",
                       "PATH": venv_bin + os.pathsep + os.environ.get("PATH", "")})
    try:
        honcho.wait_for(lambda: any(re.search(r"edge\.1\s+\| READY http=", l) for l in honcho.lines),
                        20, "the edge's READY line")
        honcho.wait_for(lambda: any(re.search(r"workers\.1\s+\| READY worker=", l) for l in honcho.lines),
                        20, "a worker's READY line")
        url = f"http://127.0.0.1:{edge_port}"
        with urllib.request.urlopen(url + "/", timeout=10) as resp:   # the chat page, --static
            assert resp.status == 200 and b"/js/phoenix.js" in resp.read()
        client = js_client("procfile")
        assert client.connect(f"ws://127.0.0.1:{edge_port}/socket", {"user": "ann"})["status"] == "open"
        assert client.join("lobby", "room:lobby", on=["new_msg"])["status"] == "ok"
        assert client.push("lobby", "ping", {"hello": "procfile"}) == \
            {"status": "ok", "response": {"hello": "procfile"}}
        client.push("lobby", "new_msg", {"body": "hi"}, nowait=True)
        client.wait_event({"type": "message", "chan": "lobby", "event": "new_msg",
                           "payload": {"body": "hi", "user": "ann"}}, 10)
        client.close()
    finally:
        code = honcho.stop(20)
        output = "\n".join(honcho.lines)
        honcho.cleanup()
    assert code == 143, output            # honcho's own code after SIGTERM
    for name in ("broker.1", "edge.1", "workers.1"):
        assert f"{name} stopped (rc=0)" in output, output
    assert "Traceback" not in output and "SIGKILL" not in output
