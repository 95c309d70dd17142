"""The chaos benchmark's short schedule as a test: 40 phoenix.js clients in their channels on two
edges while a worker is killed every 2 s for 30 s, the broker is killed and restarted, and one
edge is SIGTERMed and restarted (`bench/chaos.py --quick`, about 45 s).

The run happens once per module; each test checks one property of its summary. The first group
is what a fault may never break; the second is the "Done when" of issue 10 ("Faults without
outages") on the short schedule.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.jsclient import node_available

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not node_available(), reason="node or node_modules (phoenix, ws) missing"),
]

RUN_TIMEOUT = 150   # the run is bounded by its own schedule; this only guards against a hang


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    """Summary of one `bench/chaos.py --quick` run (see bench/chaosreport.py for its fields)."""
    out = tmp_path_factory.mktemp("chaos") / "summary.json"
    argv = [sys.executable, "bench/chaos.py", "--quick", "--seed", "10", "--drain-timeout", "45",
            "--json", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)   # it stops every process it started, then exits
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"bench/chaos.py --quick ran longer than {RUN_TIMEOUT} s\n{stderr[-4000:]}")
    assert proc.returncode == 0, f"bench/chaos.py failed ({proc.returncode}):\n{stderr[-6000:]}"
    summary = json.loads(out.read_text())
    print(stdout)   # the table, shown with -s or on failure
    return summary


def row(summary: dict, fault: str) -> dict:
    return summary["rows"][fault]


# ---- never broken ----------------------------------------------------------------------

def test_every_client_ends_joined(chaos):
    assert chaos["joined_at_end"] == chaos["clients"]
    assert row(chaos, "overall")["never_rejoined"] == 0


def test_every_ping_gets_an_outcome(chaos):
    pings = row(chaos, "overall")["pings"]
    assert pings["none"] == 0, pings
    assert chaos["double_outcomes"] == 0
    assert pings["ok"] > 0


def test_no_broadcast_is_duplicated(chaos):
    assert row(chaos, "overall")["broadcasts_duplicated"] == 0


def test_replies_and_broadcasts_reach_the_right_client(chaos):
    assert chaos["wrong_replies"] == 0
    assert chaos["misrouted"] == 0


def test_the_schedule_ran(chaos):
    """Guards the other tests against a run that faulted nothing."""
    assert chaos["kills"]["total"] == 15
    assert chaos["broker"]["ready"] is not None
    assert chaos["edge"]["ready"] is not None and chaos["edge_clients"] > 0
    assert chaos["unexpected_exits"] == []


# ---- issue 10, "Done when" -----------------------------------------------------------------

def test_no_broadcast_lost_outside_fault_windows(chaos):
    w = row(chaos, "worker kills")
    assert w["broadcasts_owed"] > 0
    assert w["broadcasts_lost"] == 0, chaos["lost_examples"]


def test_out_of_channel_at_most_3s_after_a_worker_kill(chaos):
    w = row(chaos, "worker kills")
    assert w["never_rejoined"] == 0
    assert w["out_max_s"] is None or w["out_max_s"] <= chaos["config"]["bound_out"], w


def test_out_of_channel_at_most_3s_after_the_broker_restart(chaos):
    b = row(chaos, "broker restart")
    assert b["never_rejoined"] == 0
    assert b["out_max_s"] is None or b["out_max_s"] <= chaos["config"]["bound_out"], b


def test_edge_clients_rejoin_within_2s_of_a_reachable_attempt(chaos):
    e = row(chaos, "edge restart")
    value = e["rejoin_after_reachable_max_s"]
    assert value is not None and value <= chaos["config"]["bound_edge"], e


def test_no_traceback_in_any_log(chaos):
    assert row(chaos, "overall")["tracebacks"] == 0, chaos["logs"]


def test_every_ping_answered_or_surfaced_as_an_error(chaos):
    pings = row(chaos, "overall")["pings"]
    assert pings["timeout"] + pings["none"] == 0, pings


def test_no_kill_finds_the_supervisor_without_a_ready_worker(chaos):
    assert chaos["kills"]["no_live_worker"] == 0, chaos["kills"]
