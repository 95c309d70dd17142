"""Where each option of a `zchannels` command comes from: flag > environment > file > default.

Every option of every command (the parsers are built in zchannels/cli.py) can also be given

- as an environment variable ``ZCHANNELS_<NAME>``: ``--max-frame-size`` is
  ``ZCHANNELS_MAX_FRAME_SIZE``, APP is ``ZCHANNELS_APP``; an empty variable counts as unset;
- in a TOML file named by ``--config FILE`` (or ``ZCHANNELS_CONFIG``), under the option's
  name (``max-frame-size`` or ``max_frame_size``): in the table of a command (``[edge]``,
  ``[broker]``, ``[workers]``, ``[dev]``, ``[publish]``, ``[keys]``), or at the top level,
  shared by every command that has the option (``bus``, ``log-level``, the CURVE key files);
  a command's table wins over the top level.

A value from the environment or the file goes through the option's own conversion and checks
(its argparse ``type`` and ``choices``), so a bad one fails like a bad flag, in one line that
says where it came from.  On/off options take 1/0, true/false, yes/no, on/off (a TOML boolean
in the file); list options (``--allowed-origins``, ``--trusted-proxies``) take their flag's
comma-separated text, or a TOML array; a repeatable option (``keys --name``) takes a TOML
array or comma-separated names.  A key the file's table does not know, or a table that is not a
command, is an error too: a typo must not be ignored silently.

``resolve`` does the whole job for one command line and tells each value's source, which
`zchannels config COMMAND ...` prints (zchannels/showconfig.py) with secrets masked.  A
process that starts others (`dev`, `edge --processes N`) gives them every option on their
command line and its secrets in their environment (``child_environ``), so they never read the
file or the variables again.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Mapping

ENV_PREFIX = "ZCHANNELS_"
CONFIG_ENV = "ZCHANNELS_CONFIG"
# Positionals that are configuration (the handler module), unlike per-run data such as
# `publish TOPIC EVENT JSON` or `keys DIR`.
CONFIGURABLE_POSITIONALS = frozenset({"app"})
# Options that are never read from the environment or the file.
_NOT_CONFIGURABLE = frozenset({"help", "version", "config"})

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_SECRET_NAME = re.compile(r"token|secret|password|passwd|key")
_PATH_METAVARS = frozenset({"FILE", "DIR", "PATH"})


class ConfigError(Exception):
    """A value from the command line's environment or config file that cannot be used; ``prog``
    is the command (``zchannels edge``) it was for, the text says which value and where."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


@dataclass(frozen=True)
class Setting:
    """One option's effective value and where it came from."""
    name: str          # the option's name: "max-frame-size", "app"
    dest: str          # its attribute on the parsed arguments
    value: Any
    source: str        # "flag", "env", "file" or "default"
    origin: str        # the variable ("ZCHANNELS_PORT") or the file and table; "" otherwise
    secret: bool       # masked when shown

    def where(self) -> str:
        return f"{self.source} {self.origin}" if self.origin else self.source


@dataclass(frozen=True)
class Resolved:
    """A parsed command line: the arguments to run with, and each option's source."""
    command: str
    args: argparse.Namespace
    settings: list[Setting]
    config_file: str | None


# --- options --------------------------------------------------------------------------

def option_name(action: argparse.Action) -> str:
    """``--max-frame-size`` -> ``max-frame-size``; a positional's dest (``app``)."""
    longs = [s for s in action.option_strings if s.startswith("--")]
    return longs[0][2:] if longs else action.dest.replace("_", "-")


def env_name(action: argparse.Action) -> str:
    """The environment variable of an option: ``ZCHANNELS_MAX_FRAME_SIZE``."""
    return ENV_PREFIX + option_name(action).upper().replace("-", "_")


def configurable(action: argparse.Action) -> bool:
    if isinstance(action, argparse._SubParsersAction) or action.dest in _NOT_CONFIGURABLE:
        return False
    return bool(action.option_strings) or action.dest in CONFIGURABLE_POSITIONALS


def is_secret(action: argparse.Action) -> bool:
    """A value that is itself a secret (a token, a key), as opposed to a key file's path."""
    return (action.nargs != 0 and bool(_SECRET_NAME.search(option_name(action)))
            and action.metavar not in _PATH_METAVARS)


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands by name."""
    for action in parser._actions:   # argparse has no public list of a parser's options
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if configurable(a)]


def config_env_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every environment variable that configures some command, and ZCHANNELS_CONFIG."""
    return {CONFIG_ENV} | {env_name(a) for sub in commands(parser).values() for a in _options(sub)}


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"read options from this TOML file (default: env {CONFIG_ENV}); "
                             "flags win over environment variables (ZCHANNELS_<FLAG>), which win "
                             "over the file; `zchannels config` shows where each value comes from")


# --- values ---------------------------------------------------------------------------

def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1] if action.option_strings else str(action.metavar or action.dest)


def _boolean(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {raw!r}")


def _text(raw: Any) -> str:
    """A TOML or environment value as the text the flag would have been given."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, (int, float, str)):
        return str(raw)
    if isinstance(raw, list) and all(isinstance(x, (str, int, float)) and not isinstance(x, bool)
                                     for x in raw):
        return ",".join(str(x) for x in raw)
    raise ValueError(f"expected a string, a number, a boolean or an array of strings, got {raw!r}")


def _convert_one(action: argparse.Action, raw: Any) -> Any:
    """``raw`` through the option's type and choices, with argparse's error texts."""
    text = _text(raw)
    if action.choices is not None and set(action.choices) == {"true", "false"}:
        text = "true" if _boolean(text) else "false"
    if action.type is None:
        value: Any = text
    else:
        try:
            value = action.type(text)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        except (TypeError, ValueError):
            name = getattr(action.type, "__name__", repr(action.type))
            raise ValueError(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"invalid choice: {value!r} (choose from {choices})")
    return value


def convert(action: argparse.Action, raw: Any) -> Any:
    """A value from the environment (text) or a TOML file for ``action``; ValueError if bad."""
    if action.nargs == 0:   # store_true and its kind: present or not
        return action.const if _boolean(raw) else action.default
    if isinstance(action, argparse._AppendAction):
        items = raw if isinstance(raw, list) else [p for p in _text(raw).split(",") if p.strip()]
        return [_convert_one(action, item.strip() if isinstance(item, str) else item) for item in items]
    return _convert_one(action, raw)


# --- the file ---------------------------------------------------------------------------

class ConfigFile:
    """A parsed TOML config file, checked against every command's options."""

    def __init__(self, path: str, data: dict[str, Any], names: dict[str, set[str]]):
        self.path = path
        self.tables: dict[str, dict[str, Any]] = {}
        for key, value in data.items():   # no option takes a table: a table is a command's
            if isinstance(value, dict):
                if key not in names:
                    raise ValueError(f"unknown table [{key}]; the tables are the commands: "
                                     + ", ".join(f"[{name}]" for name in names))
                self.tables[key] = _checked(value, names[key], f" in [{key}]")
        self.top = _checked({k: v for k, v in data.items() if not isinstance(v, dict)},
                            set().union(*names.values()), "")

    @classmethod
    def load(cls, path: str, names: dict[str, set[str]]) -> "ConfigFile":
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"not valid TOML: {exc}") from None
        return cls(path, data, names)

    def lookup(self, command: str, name: str) -> tuple[Any, str] | None:
        """(value, where) for option ``name`` of ``command``: its table's, else the top level's."""
        if name in self.tables.get(command, {}):
            return self.tables[command][name], f"{self.path} [{command}]"
        if name in self.top:
            return self.top[name], f"{self.path} (top level)"
        return None


def _checked(table: dict[str, Any], known: set[str], where: str) -> dict[str, Any]:
    """``table`` by option name (``max_frame_size`` is ``max-frame-size``); ValueError for a
    key that is no option, or one option given twice."""
    found: dict[str, Any] = {}
    written: dict[str, str] = {}
    for key, value in table.items():
        name = key.replace("_", "-")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown key {key!r}{where}{hint}")
        if name in found:
            raise ValueError(f"{written[name]!r} and {key!r}{where} are the same option")
        found[name], written[name] = value, key
    return found


# --- resolving ----------------------------------------------------------------------------

def resolve(parser: argparse.ArgumentParser, argv: list[str],
            environ: Mapping[str, str] = os.environ, require: bool = True) -> Resolved:
    """Parse ``argv`` with ``parser`` (argparse errors exit as usual), then fill each option of
    the chosen command that the flags left out from ``environ``, the config file, or its
    default.  Raises ConfigError for a bad value from the environment or the file, a bad file,
    or (with ``require``) an APP given nowhere."""
    subs = commands(parser)
    parsed = parser.parse_args(argv)   # --help, --version and usage errors exit here, as usual
    explicit = _given(parser, argv)
    command = explicit.command
    sub = subs[command]
    config_path = getattr(explicit, "config", None) or environ.get(CONFIG_ENV) or None
    file = None
    if config_path:
        names = {name: {option_name(a) for a in _options(p)} for name, p in subs.items()
                 if _options(p)}
        try:
            file = ConfigFile.load(config_path, names)
        except ValueError as exc:
            where = "--config" if getattr(explicit, "config", None) else CONFIG_ENV
            raise ConfigError(sub.prog, f"config file {config_path} ({where}): {exc}") from None
    args = argparse.Namespace(**vars(parsed))
    settings = []
    for action in _options(sub):
        setting = _resolve_one(sub.prog, command, action, explicit, environ, file,
                               getattr(parsed, action.dest))
        setattr(args, action.dest, setting.value)
        settings.append(setting)
        if require and setting.value is None and action.dest in CONFIGURABLE_POSITIONALS:
            raise ConfigError(sub.prog, f"{_flag(action)} is missing: give it as an argument, as "
                                        f"env {env_name(action)} or as {option_name(action)} "
                                        f"in the config file")
    return Resolved(command, args, settings, config_path)


def _given(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed again with every default SUPPRESSed: only what it gives is set."""
    subs = list(commands(parser).values())
    saved = [[action.default for action in sub._actions] for sub in subs]
    try:
        for sub in subs:
            for action in sub._actions:
                action.default = argparse.SUPPRESS
        return parser.parse_args(argv)
    finally:
        for sub, defaults in zip(subs, saved):
            for action, default in zip(sub._actions, defaults):
                action.default = default


def _resolve_one(prog: str, command: str, action: argparse.Action, explicit: argparse.Namespace,
                 environ: Mapping[str, str], file: ConfigFile | None, default: Any) -> Setting:
    name, secret = option_name(action), is_secret(action)
    if hasattr(explicit, action.dest):
        return Setting(name, action.dest, getattr(explicit, action.dest), "flag", "", secret)
    candidates = []
    if environ.get(env_name(action)):
        candidates.append((environ[env_name(action)], "env", env_name(action)))
    if file is not None and (found := file.lookup(command, name)) is not None:
        candidates.append((found[0], "file", found[1]))
    for raw, source, origin in candidates[:1]:
        try:
            return Setting(name, action.dest, convert(action, raw), source, origin, secret)
        except ValueError as exc:
            raise ConfigError(prog, f"{_flag(action)} from {source} {origin}: {exc}") from None
    return Setting(name, action.dest, default, "default", "", secret)


def child_environ(parser: argparse.ArgumentParser, environ: Mapping[str, str],
                  settings: list[Setting]) -> dict[str, str]:
    """The environment for a process this one starts with every option on its command line:
    ``environ`` without the variables that configure zchannels (so the child does not read
    them, or the config file, again), plus this command's secrets as ZCHANNELS_<NAME>, which
    keeps them out of process listings."""
    drop = config_env_names(parser)
    env = {key: value for key, value in environ.items() if key not in drop}
    for setting in settings:
        if setting.secret and setting.value is not None:
            env[ENV_PREFIX + setting.name.upper().replace("-", "_")] = str(setting.value)
    return env
