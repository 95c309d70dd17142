"""`zchannels config COMMAND [flags...]`: the configuration COMMAND would run with.

One line per option, in TOML under the command's table, so the output can be pasted into a
config file, each with a comment saying where the value came from (flag, env VARIABLE, file
PATH [table], or default).  Values that are secrets themselves (--status-token, --api-key;
zchannels/config.py's ``is_secret``) are masked; the paths of key files are shown.
"""
from __future__ import annotations

import json
import math
from typing import Any

from zchannels.config import Resolved, Setting

MASK = "********"


def toml_value(value: Any) -> str:
    """``value`` as a TOML value (the config file's syntax)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))   # JSON's escapes are TOML basic-string escapes


def _line(setting: Setting) -> str:
    if setting.value is None:
        return f"# {setting.name} is not set"
    shown = json.dumps(MASK) if setting.secret else toml_value(setting.value)
    return f"{setting.name} = {shown}"


def render(resolved: Resolved) -> str:
    """The text `zchannels config` prints for ``resolved``."""
    head = [f"# zchannels {resolved.command}: the effective configuration "
            "(a flag wins over env ZCHANNELS_*, which wins over the config file)",
            f"# config file: {resolved.config_file or 'none'}",
            f"[{resolved.command}]"]
    lines = [_line(s) for s in resolved.settings]
    width = max((len(line) for line in lines), default=0) + 2
    body = [f"{line:<{width}}# {s.where()}" for line, s in zip(lines, resolved.settings)]
    return "\n".join(head + body) + "\n"
