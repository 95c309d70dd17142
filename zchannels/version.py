"""The version `zchannels --version` prints.

From a checkout, the checkout's own setup.cfg: the code that runs is the checkout's, and an
editable install's package metadata keeps the version it was installed with.  Installed from
a wheel or an sdist, the package metadata.
"""
from __future__ import annotations

import configparser
import functools
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "zchannels"
CHECKOUT_SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def _checkout_version(setup_cfg: Path) -> str | None:
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg, encoding="utf-8")
    except configparser.Error:
        return None
    if parser.get("metadata", "name", fallback=None) != DISTRIBUTION:
        return None
    return parser.get("metadata", "version", fallback=None)


@functools.cache
def version() -> str:
    """This zchannels' version, e.g. ``0.1.0``; ``unknown`` if nothing says."""
    found = _checkout_version(CHECKOUT_SETUP_CFG) if CHECKOUT_SETUP_CFG.is_file() else None
    if found:
        return found
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
