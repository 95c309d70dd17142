"""One logging set-up for every zchannels process: one line per event on stderr.

``--log-format text`` (the default) is for people; ``--log-format json`` writes one JSON
object per line (time, level, process kind, pid, logger, message, and the traceback as
``exc`` when there is one) for log collectors that should not have to parse text.
"""
from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record; `process` is the kind of process (broker, edge, worker0...)."""

    def __init__(self, process: str):
        super().__init__()
        self.kind = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "process": self.kind,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: a message argument that is not JSON-serialisable still gets logged.
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str = "info", process: str = "zchannels", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s {process}[%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def announce_ready(**fields: object) -> None:
    """Print the machine-readable READY line that launchers and tests wait for."""
    text = " ".join(f"{k}={v}" for k, v in fields.items())
    sys.stdout.write(f"READY {text}\n")
    sys.stdout.flush()
