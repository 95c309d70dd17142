"""The typed public API: mypy passes the API modules and the examples strictly, rejects a
handler full of mistakes line by line, and the build ships the ``py.typed`` markers.

The mypy configuration is the ``[mypy]`` section of setup.cfg (strict; its ``files`` are the
public API modules, the examples and tests/typecheck/good_handler.py).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BAD_HANDLER = "tests/typecheck/bad_handler.py"
MYPY_TIMEOUT = 240   # seconds; a cold run (no .mypy_cache) takes about 20

needs_mypy = pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                                reason="mypy is not installed (it is in the test extras: "
                                       "pip install -e '.[test]')")


def run_mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", "setup.cfg", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=MYPY_TIMEOUT)


def errors_by_line(output: str, path: str) -> dict[int, set[str]]:
    """mypy's ``path:LINE: error: ...  [code]`` lines -> {line: {codes}} (notes left out)."""
    found: dict[int, set[str]] = {}
    for line, code in re.findall(rf"^{re.escape(path)}:(\d+): error: .*\[([a-z-]+)\]$", output, re.M):
        found.setdefault(int(line), set()).add(code)
    return found


def marked_errors(path: str) -> dict[int, set[str]]:
    """The ``# error: [code, ...]`` markers of a file -> {line: {codes}}."""
    marked: dict[int, set[str]] = {}
    for number, text in enumerate((ROOT / path).read_text().splitlines(), start=1):
        match = re.search(r"#\s*error:\s*\[([a-z, -]+)\]\s*$", text)
        if match:
            marked[number] = {code.strip() for code in match.group(1).split(",")}
    return marked


@needs_mypy
@pytest.mark.timeout(MYPY_TIMEOUT + 30)
def test_public_api_and_examples_pass_mypy_strict():
    result = run_mypy()
    assert result.returncode == 0, f"mypy found problems:\n{result.stdout}{result.stderr}"
    assert re.search(r"^Success: no issues found in \d+ source files$", result.stdout, re.M), result.stdout


@needs_mypy
@pytest.mark.timeout(MYPY_TIMEOUT + 30)
def test_mypy_reports_every_mistake_in_a_wrong_handler_and_nothing_else():
    expected = marked_errors(BAD_HANDLER)
    assert len(expected) >= 15, "the marked mistakes of bad_handler.py were not found"
    result = run_mypy(BAD_HANDLER)
    assert result.returncode == 1, f"mypy did not fail:\n{result.stdout}{result.stderr}"
    reported = errors_by_line(result.stdout, BAD_HANDLER)
    missed = {line: codes - reported.get(line, set()) for line, codes in expected.items()
              if codes - reported.get(line, set())}
    unexpected = {line: codes - expected.get(line, set()) for line, codes in reported.items()
                  if codes - expected.get(line, set())}
    assert not missed and not unexpected, (
        f"mypy missed {missed} and reported unmarked {unexpected} (line: codes):\n{result.stdout}")


@pytest.mark.timeout(120)
def test_the_build_ships_the_py_typed_markers(tmp_path):
    # setuptools' build_py lays out what a wheel installs (packages and their package data);
    # it runs on a copy, so the checkout gets no build/ or egg-info directories.
    source, out = tmp_path / "src", tmp_path / "lib"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("broker", "bus", "edge", "workers", "zchannels"):
        shutil.copytree(ROOT / package, source / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "--quiet",
         "build_py", "--build-lib", str(out)],
        cwd=source, capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "zchannels" / "workers" / "py.typed").is_file()
    assert (out / "zchannels" / "py.typed").is_file()
    assert (out / "zchannels" / "workers" / "payload.py").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["zchannels"]   # nothing else at the top
