"""One logging set-up for every zchannels process: one line per event on stderr."""
from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "info", process: str = "zchannels") -> None:
    handler = logging.StreamHandler(sys.stderr)
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
