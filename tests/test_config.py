"""Configuration of the `zchannels` commands (zchannels/config.py): every option from a flag, an
environment variable ZCHANNELS_<FLAG> or a TOML file (--config / ZCHANNELS_CONFIG), in that
order of precedence over the default; values from the environment and the file checked like
flags; `zchannels config COMMAND` showing each value's source with secrets masked; the
children of `edge --processes N` getting their secrets through the environment, never their
command line; `zchannels --version`.

The precedence rules are tested on the parser (zchannels.cli.build_parser, as `zchannels` uses
it); real `python -m zchannels` processes show that a running broker and edge obey them.
"""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, Proc, wait_until
from zchannels import config
from zchannels.cli import build_parser, edge_process_options
from zchannels.showconfig import MASK, render

pytestmark = pytest.mark.timeout(60)


def resolve(argv: list[str], env: dict[str, str] | None = None, require: bool = True) -> config.Resolved:
    return config.resolve(build_parser(), argv, environ=env or {}, require=require)


def setting(resolved: config.Resolved, name: str) -> config.Setting:
    return next(s for s in resolved.settings if s.name == name)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def zchannels(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0
              ) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in config.config_env_names(build_parser())}
    return subprocess.run([sys.executable, "-m", "zchannels", *map(str, args)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout, env={**clean, **(env or {})})


# --- precedence ------------------------------------------------------------------------

@pytest.mark.parametrize("flag, env, file, expected, source", [
    (None, None, None, 4000, "default"),
    (None, None, "4003", 4003, "file"),
    (None, "4002", "4003", 4002, "env"),
    ("4001", "4002", "4003", 4001, "flag"),
    ("4001", None, "4003", 4001, "flag"),
    ("4001", "4002", None, 4001, "flag"),
    (None, "4002", None, 4002, "env"),
])
def test_a_flag_wins_over_the_environment_which_wins_over_the_file_then_the_default(
        tmp_path, flag, env, file, expected, source):
    argv = ["edge"] + (["--port", flag] if flag else [])
    environ = {"ZCHANNELS_PORT": env} if env else {}
    if file:
        environ["ZCHANNELS_CONFIG"] = write(tmp_path / "z.toml", f"[edge]\nport = {file}\n")
    resolved = resolve(argv, environ)
    assert resolved.args.port == expected
    assert setting(resolved, "port").source == source


def test_every_option_of_every_command_has_its_variable_and_its_file_key():
    for name, sub in config.commands(build_parser()).items():
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "config"):
                assert config.env_name(action) == "ZCHANNELS_" + \
                    action.option_strings[-1][2:].upper().replace("-", "_"), (name, action.dest)
    assert "ZCHANNELS_MAX_FRAME_SIZE" in config.config_env_names(build_parser())
    assert "ZCHANNELS_APP" in config.config_env_names(build_parser())


def test_a_commands_table_wins_over_the_shared_top_level_and_keys_take_dashes_or_underscores(tmp_path):
    path = write(tmp_path / "z.toml", 'bus = "tcp://10.0.0.1:6000"\nlog_level = "debug"\n'
                                      'max-bus-message = 9000000\n'
                                      '[broker]\nbus = "tcp://*:6000"\n'
                                      '[edge]\nmax_frame_size = 2000000\n')
    broker = resolve(["broker", "--config", path])
    assert broker.args.bus == "tcp://*:6000" and setting(broker, "bus").origin == f"{path} [broker]"
    assert broker.args.log_level == "debug" and setting(broker, "log-level").origin == f"{path} (top level)"
    edge = resolve(["edge", "--config", path])
    assert edge.args.bus == "tcp://10.0.0.1:6000" and edge.args.max_frame_size == 2_000_000
    assert edge.args.max_bus_message == 9_000_000
    assert edge.args.port == 4000   # an option the file does not name keeps its default


def test_the_config_file_may_come_from_the_environment_and_a_flag_names_another(tmp_path):
    one = write(tmp_path / "one.toml", "[edge]\nport = 4101\n")
    two = write(tmp_path / "two.toml", "[edge]\nport = 4102\n")
    assert resolve(["edge"], {"ZCHANNELS_CONFIG": one}).args.port == 4101
    assert resolve(["edge", "--config", two], {"ZCHANNELS_CONFIG": one}).args.port == 4102
    assert resolve(["--config", two, "edge"]).args.port == 4102   # before the command, too


def test_on_off_options_take_1_0_true_false_yes_no_and_toml_booleans(tmp_path):
    for text, value in [("1", True), ("true", True), ("YES", True), ("on", True),
                        ("0", False), ("false", False), ("no", False), ("off", False)]:
        assert resolve(["edge"], {"ZCHANNELS_COMPRESS": text}).args.compress is value, text
        assert resolve(["edge"], {"ZCHANNELS_CHECK_ORIGIN": text}).args.check_origin == str(value).lower()
    path = write(tmp_path / "z.toml", "[edge]\nno-longpoll = true\ncheck-origin = false\n")
    args = resolve(["edge", "--config", path]).args
    assert args.no_longpoll is True and args.check_origin == "false"
    # The flag still wins: an env "false" does not undo --compress on the command line.
    assert resolve(["edge", "--compress"], {"ZCHANNELS_COMPRESS": "false"}).args.compress is True


def test_list_options_take_their_flag_text_or_a_toml_array(tmp_path):
    path = write(tmp_path / "z.toml", '[edge]\nallowed-origins = ["https://example.com", "//*.other.com"]\n'
                                      'trusted_proxies = "127.0.0.1/32,10.0.0.0/8"\n')
    args = resolve(["edge", "--config", path]).args
    assert args.allowed_origins == "https://example.com,//*.other.com"
    assert args.trusted_proxies == "127.0.0.1/32,10.0.0.0/8"
    env = {"ZCHANNELS_ALLOWED_ORIGINS": "//a.example.com,//b.example.com"}
    assert resolve(["edge"], env).args.allowed_origins == "//a.example.com,//b.example.com"
    keys = write(tmp_path / "keys.toml", '[keys]\nname = ["edge-eu", "worker-2"]\n')
    assert resolve(["keys", "d", "--config", keys]).args.name == ["edge-eu", "worker-2"]
    assert resolve(["keys", "d"], {"ZCHANNELS_NAME": "a, b"}).args.name == ["a", "b"]


def test_the_app_comes_from_the_command_line_the_environment_or_the_file(tmp_path):
    assert resolve(["workers", "x.py"], {"ZCHANNELS_APP": "y.py"}).args.app == "x.py"
    assert resolve(["workers"], {"ZCHANNELS_APP": "y.py"}).args.app == "y.py"
    path = write(tmp_path / "z.toml", '[workers]\napp = "pkg.channels:socket"\nworkers = 4\n')
    args = resolve(["workers", "--config", path]).args
    assert (args.app, args.workers) == ("pkg.channels:socket", 4)
    with pytest.raises(config.ConfigError, match=r"APP is missing: .*ZCHANNELS_APP.*app in the config file"):
        resolve(["workers"])


def test_dev_runs_the_chat_example_without_an_app():
    args = resolve(["dev", "--port", "4001"]).args
    assert Path(args.app).resolve() == ROOT / "examples" / "chat" / "channels.py"


# --- bad values: one line naming where they came from -------------------------------------

@pytest.mark.parametrize("env, text", [
    ({"ZCHANNELS_PORT": "abc"}, "--port from env ZCHANNELS_PORT: invalid int value: 'abc'"),
    ({"ZCHANNELS_MAX_INBOUND_BUFFERED": "0"},
     "--max-inbound-buffered from env ZCHANNELS_MAX_INBOUND_BUFFERED: must be more than 0, got 0"),
    ({"ZCHANNELS_LOG_LEVEL": "loud"}, "--log-level from env ZCHANNELS_LOG_LEVEL: invalid choice: 'loud'"),
    ({"ZCHANNELS_COMPRESS": "maybe"}, "--compress from env ZCHANNELS_COMPRESS: expected 1/0, true/false"),
    ({"ZCHANNELS_ALLOWED_ORIGINS": "ht!p://x"}, "--allowed-origins from env ZCHANNELS_ALLOWED_ORIGINS: "
                                                 "allowed origin 'ht!p://x' has no host"),
])
def test_a_bad_value_from_the_environment_is_checked_like_the_flag(env, text):
    with pytest.raises(config.ConfigError) as caught:
        resolve(["edge"], env)
    assert str(caught.value).startswith(text) and caught.value.prog == "zchannels edge"


@pytest.mark.parametrize("toml, text", [
    ("[edge]\nport = \"x\"\n", "--port from file {path} [edge]: invalid int value: 'x'"),
    ("[edge]\nprot = 1\n", "config file {path} (--config): unknown key 'prot' in [edge]; did you mean 'port'?"),
    ("[egde]\nport = 1\n", "config file {path} (--config): unknown table [egde]; the tables are the commands: "
                           "[broker], [edge], [workers], [dev], [publish], [keys]"),
    ("colour = 1\n", "config file {path} (--config): unknown key 'colour'"),
    ("[edge]\nmax-rate = 1\nmax_rate = 2\n", "config file {path} (--config): 'max-rate' and 'max_rate' in "
                                             "[edge] are the same option"),
    ("[edge]\nport = \n", "config file {path} (--config): not valid TOML: Invalid value (at line 2, column 8)"),
    ("[edge]\nport = [[1]]\n", "--port from file {path} [edge]: expected a string, a number, a boolean"),
])
def test_a_bad_config_file_is_one_error_naming_the_file_and_the_key(tmp_path, toml, text):
    path = write(tmp_path / "z.toml", toml)
    with pytest.raises(config.ConfigError) as caught:
        resolve(["edge", "--config", path])
    assert str(caught.value).startswith(text.format(path=path)), str(caught.value)


def test_a_key_of_another_commands_table_is_checked_too(tmp_path):
    path = write(tmp_path / "z.toml", "[edge]\nport = 4000\n[workers]\nprocesses = 2\n")
    with pytest.raises(config.ConfigError, match=r"unknown key 'processes' in \[workers\]"):
        resolve(["edge", "--config", path])


def test_a_missing_config_file_names_the_variable_that_named_it(tmp_path):
    with pytest.raises(config.ConfigError, match=r"config file .*nope.toml \(ZCHANNELS_CONFIG\): cannot read it"):
        resolve(["broker"], {"ZCHANNELS_CONFIG": str(tmp_path / "nope.toml")})


def test_real_processes_say_a_bad_value_in_one_line_and_exit_2(tmp_path):
    done = zchannels("edge", env={"ZCHANNELS_MAX_FRAME_SIZE": "big"})
    assert done.returncode == 2 and done.stderr == \
        "zchannels edge: error: --max-frame-size from env ZCHANNELS_MAX_FRAME_SIZE: invalid int value: 'big'\n"
    path = write(tmp_path / "z.toml", "[broker]\npeer_timeout = \"soon\"\n")
    done = zchannels("broker", "--config", path)
    assert done.returncode == 2 and done.stderr == \
        f"zchannels broker: error: --peer-timeout from file {path} [broker]: invalid float value: 'soon'\n"
    done = zchannels("edge", "--max-rate", "fast")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "argument --max-rate" in done.stderr


# --- zchannels config: the effective configuration, secrets masked --------------------------

def test_the_printed_configuration_names_each_source_and_masks_secrets(tmp_path):
    path = write(tmp_path / "z.toml", '[edge]\napi-key = "file-secret-key"\nport = 4100\n'
                                      f'curve-secret = "{tmp_path}/client.key_secret"\n')
    resolved = resolve(["edge", "--config", path, "--host", "0.0.0.0"],
                       {"ZCHANNELS_STATUS_TOKEN": "env-secret-token", "ZCHANNELS_PORT": "4200"})
    text = render(resolved)
    assert "file-secret-key" not in text and "env-secret-token" not in text
    lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line}
    assert re.fullmatch(rf'api-key = "{re.escape(MASK)}" +# file {re.escape(path)} \[edge\]', lines["api-key"])
    assert re.fullmatch(rf'status-token = "{re.escape(MASK)}" +# env ZCHANNELS_STATUS_TOKEN', lines["status-token"])
    assert re.fullmatch(r'port = 4200 +# env ZCHANNELS_PORT', lines["port"])
    assert re.fullmatch(r'host = "0\.0\.0\.0" +# flag', lines["host"])
    assert re.fullmatch(r'max-frame-size = 1048576 +# default', lines["max-frame-size"])
    # A key file's path is not a secret: shown, so a wrong path can be seen.
    assert f'curve-secret = "{tmp_path}/client.key_secret"' in lines["curve-secret"]
    assert "# allowed-origins is not set" in text and f"# config file: {path}" in text


def test_the_printout_is_a_config_file_that_gives_the_same_configuration(tmp_path):
    shown = render(resolve(["edge", "--port", "4321", "--compress", "--allowed-origins", "//x.example.com",
                            "--trusted-proxies", "10.0.0.0/8"]))
    path = write(tmp_path / "again.toml", shown)
    again = resolve(["edge", "--config", path])
    assert (again.args.port, again.args.compress, again.args.allowed_origins, again.args.trusted_proxies) \
        == (4321, True, "//x.example.com", "10.0.0.0/8")


def test_zchannels_config_prints_the_configuration_of_a_real_command_line(tmp_path):
    path = write(tmp_path / "z.toml", 'bus = "tcp://127.0.0.1:6100"\n[workers]\napp = "tests/apps/e2e_app.py"\n')
    done = zchannels("config", "--config", path, "workers", "-n", "3",
                     env={"ZCHANNELS_STUCK_TIMEOUT": "12.5"})
    assert done.returncode == 0, done.stderr
    assert re.search(r'^\[workers\]$', done.stdout, re.M)
    assert re.search(rf'^bus = "tcp://127\.0\.0\.1:6100" +# file {re.escape(path)} \(top level\)$', done.stdout, re.M)
    assert re.search(r'^workers = 3 +# flag$', done.stdout, re.M)
    assert re.search(r'^stuck-timeout = 12\.5 +# env ZCHANNELS_STUCK_TIMEOUT$', done.stdout, re.M)
    assert re.search(r'^app = "tests/apps/e2e_app\.py" +# file ', done.stdout, re.M)
    done = zchannels("config", "edge", env={"ZCHANNELS_API_KEY": "do-not-print-me"})
    assert done.returncode == 0 and "do-not-print-me" not in done.stdout
    assert re.search(rf'^api-key = "{re.escape(MASK)}" +# env ZCHANNELS_API_KEY$', done.stdout, re.M)
    done = zchannels("config")
    assert done.returncode == 2 and done.stderr.startswith("zchannels config: error: name the COMMAND")


# --- real processes -----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_broker_takes_its_bus_from_the_file_and_a_flag_over_the_environment(tmp_path):
    path = write(tmp_path / "z.toml", 'bus = "tcp://127.0.0.1:0"\n[broker]\nlog-format = "json"\n')
    proc = Proc("zchannels", "broker", "--log-level", "info", name="broker",
                env={"ZCHANNELS_CONFIG": path, "ZCHANNELS_LOG_LEVEL": "error"})
    try:
        (ready,) = proc.wait_ready()
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", ready["bus"])   # port 0 from the file
        # --log-level info (flag) beats ZCHANNELS_LOG_LEVEL=error: the INFO line is there,
        # in JSON (from the file's [broker] table).
        line = wait_until(lambda: next((l for l in proc.stderr_text().splitlines() if "broker up" in l), None))
        assert json.loads(line)["level"] == "INFO"
    finally:
        assert proc.stop() == 0
        proc.cleanup()


def _get(url: "str | urllib.request.Request") -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


@pytest.mark.timeout(40)
def test_edge_processes_from_the_environment_get_their_secrets_through_theirs(tmp_path):
    """ZCHANNELS_PROCESSES=2 and a token from the environment and an API key from the file: the
    children (which must not fork children of their own) serve both, and neither is on their
    command lines."""
    token, api_key = "status-token-in-env-only", "api-key-from-the-file"
    path = write(tmp_path / "z.toml", f'[edge]\napi-key = "{api_key}"\nport = 0\n')
    proc = Proc("zchannels", "edge", "--bus", "tcp://127.0.0.1:9", name="edge",
                env={"ZCHANNELS_CONFIG": path, "ZCHANNELS_PROCESSES": "2", "ZCHANNELS_STATUS_TOKEN": token})
    try:
        (ready,) = proc.wait_ready(timeout=20)
        assert ready["processes"] == "2"
        pids = [int(p) for p in re.findall(r"edge process started slot=\d+ pid=(\d+)", proc.stderr_text())]
        assert len(pids) == 2
        for pid in pids:
            assert token not in _cmdline(pid) and api_key not in _cmdline(pid)
            assert "--processes" not in _cmdline(pid)
        assert _get(f"{ready['http']}/status?status_token={token}") == 200
        assert _get(f"{ready['http']}/status?status_token=wrong") == 403
        request = urllib.request.Request(f"{ready['http']}/api/broadcast", data=b"{}", method="POST",
                                         headers={"Authorization": "Bearer wrong"})
        assert _get(request) == 401   # the endpoint is on: the key reached the children
    finally:
        assert proc.stop(15) == 0
        proc.cleanup()


def test_child_environments_drop_the_configuration_and_carry_the_secrets():
    resolved = resolve(["edge", "--api-key", "k1"], {"ZCHANNELS_STATUS_TOKEN": "t1"})
    env = config.child_environ(build_parser(), {"ZCHANNELS_CONFIG": "/etc/z.toml", "ZCHANNELS_PROCESSES": "4",
                                                "ZCHANNELS_STATUS_TOKEN": "t1", "ZCHANNELS_SECRET_KEY_BASE": "s",
                                                "PATH": "/bin"}, resolved.settings)
    assert env == {"ZCHANNELS_SECRET_KEY_BASE": "s", "PATH": "/bin", "ZCHANNELS_STATUS_TOKEN": "t1",
                   "ZCHANNELS_API_KEY": "k1"}
    options = edge_process_options(resolved.args)
    assert "k1" not in options and "t1" not in options and "--api-key" not in options


# --- zchannels --version --------------------------------------------------------------------

def test_version_is_the_checkouts_setup_cfg_version():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    done = zchannels("--version")
    assert done.returncode == 0 and done.stdout == f"zchannels {cfg['metadata']['version']}\n"


def test_the_readmes_example_config_file_configures_broker_edge_and_workers(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("### Configuration", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    path = write(tmp_path / "zchannels.toml", example)
    broker = resolve(["broker", "--config", path]).args
    assert (broker.bus, broker.curve_clients, broker.log_format) == ("tcp://*:5570", "/etc/zchannels/keys", "json")
    edge = resolve(["edge", "--config", path]).args
    assert (edge.bus, edge.host, edge.compress, edge.allowed_origins) == \
        ("tcp://10.0.0.5:5570", "0.0.0.0", True, "https://chat.example.com")
    assert edge.curve_secret == "/etc/zchannels/keys/client.key_secret"
    workers = resolve(["workers", "--config", path]).args
    assert (workers.app, workers.workers, workers.curve_server_key) == \
        ("myapp.channels", 4, "/etc/zchannels/keys/broker.key")
