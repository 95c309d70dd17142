"""The repository's layout rules, read from the source with ast (scripts/importcycles.py):
no import cycles among the project's modules, and the import direction edge -> bus <- workers,
broker -> bus, with nothing in edge/ or workers/ importing the broker."""
from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import pytest

from scripts.importcycles import INSIDE_ZCHANNELS, cycles, import_graph, project_modules

pytestmark = pytest.mark.timeout(60)

project_graph = functools.cache(import_graph)   # the repository's, read once


def test_no_import_cycles_among_the_projects_modules():
    found = cycles(project_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(loop) for loop in found)


def package_of(module: str) -> str:
    """broker, bus, edge, workers (inside zchannels), or the top-level package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "zchannels" and len(parts) > 1 and parts[1] in INSIDE_ZCHANNELS \
        else parts[0]


def imports_between_packages() -> set[tuple[str, str, str]]:
    """(module, its package, an imported package) for every import across packages."""
    return {(name, package_of(name), package_of(target))
            for name, targets in project_graph().items() for target in targets
            if package_of(target) != package_of(name)}


@pytest.mark.parametrize("package", ["edge", "workers"])
def test_edge_and_workers_never_import_the_broker(package):
    offenders = sorted(name for name, source, target in imports_between_packages()
                       if source == package and target == "broker")
    assert not offenders, f"{package}/ modules importing broker/: {offenders}"


def test_edge_and_workers_never_import_each_other():
    offenders = sorted((name, target) for name, source, target in imports_between_packages()
                       if {source, target} == {"edge", "workers"})
    assert not offenders, offenders


def test_the_bus_imports_nothing_of_the_project_but_itself():
    offenders = sorted((name, target) for name, source, target in imports_between_packages()
                       if source == "bus")
    assert not offenders, offenders


def test_the_broker_imports_only_the_bus():
    # broker/__main__.py is `python -m broker`, which runs the command line in zchannels/cli.py.
    offenders = sorted((name, target) for name, source, target in imports_between_packages()
                       if source == "broker" and target != "bus" and name != "zchannels.broker.__main__")
    assert not offenders, offenders


def test_every_project_package_is_scanned():
    names = project_modules()
    for module in ("zchannels.broker.router", "zchannels.bus.wire", "zchannels.edge.hub",
                   "zchannels.workers.runner", "zchannels.cli",
                   "bench.run", "tests.conftest", "examples.chat.channels"):
        assert module in names, module


# --- the checker itself, on a made-up tree ----------------------------------------------

def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_finds_a_cycle_through_an_import_inside_a_function(tmp_path):
    write(tmp_path, {
        "workers/__init__.py": "",
        "workers/a.py": "from zchannels.workers.b import X\n",
        "workers/b.py": "def f():\n    from zchannels.workers import a\n",
        "workers/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zchannels.workers.a import Y\n",
        "bus/__init__.py": "",
        "bus/wire.py": "from . import peer\n",
        "bus/peer.py": "from .wire import pack\n",
    })
    assert cycles(import_graph(tmp_path)) == [
        ["zchannels.bus.peer", "zchannels.bus.wire", "zchannels.bus.peer"],
        ["zchannels.workers.a", "zchannels.workers.b", "zchannels.workers.a"]]


def test_the_checker_leaves_type_checking_imports_and_outside_modules_out(tmp_path):
    write(tmp_path, {
        "edge/__init__.py": "",
        "edge/hub.py": "import os\nfrom zchannels.edge.conn import Connection\n",
        "edge/conn.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from zchannels.edge.hub import Hub\n",
    })
    graph = import_graph(tmp_path)
    assert graph["zchannels.edge.hub"] == {"zchannels.edge.conn"} and graph["zchannels.edge.conn"] == set()
    assert cycles(graph) == []
