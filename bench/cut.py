"""How long a cut of one edge's bus link keeps its clients out of service.

A broker, two workers and two edges: edge A reaches the broker through a TCP proxy
(tests/tcpproxy.py) that the run freezes for ``--cut`` seconds, edge B directly.  Victim
clients (phoenix.js) connect through a round-robin TCP balancer in front of A and B and land on
A; an observer connects to B.  Each client pushes ``ping`` (1 s timeout) every 200 ms.

Printed per client: seconds from the start of the cut until a push sent after it was answered
ok ("served again"), pushes timed out or refused, channel errors and socket closes seen.

    .venv/bin/python bench/cut.py --cut 10 --victims 2
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import E2E_APP, Proc   # noqa: E402
from tests.jsclient import JsClient          # noqa: E402
from tests.tcpproxy import BusLink, TcpProxy  # noqa: E402


class Pinger(threading.Thread):
    def __init__(self, client: JsClient, interval: float = 0.2):
        super().__init__(daemon=True)
        self.client, self.interval = client, interval
        self.results: list[tuple[float, float, str]] = []   # (sent, answered, status)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                status = self.client.push("c", "ping", {"t": sent}, timeout_ms=1000)["status"]
            except Exception as exc:   # the driver answers "no channel" while rejoining
                status = f"driver: {str(exc)[:40]}"
            self.results.append((sent, time.monotonic(), status))
            self.stop.wait(self.interval)

    def served_again(self, since: float) -> float | None:
        for sent, answered, status in self.results:
            if sent >= since and status == "ok":
                return answered - since
        return None

    def failures(self, since: float) -> int:
        return sum(1 for sent, _, status in self.results if sent >= since and status != "ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cut", type=float, default=10.0, help="seconds the link is frozen")
    parser.add_argument("--victims", type=int, default=2, help="clients on the cut edge")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay on the link, s")
    parser.add_argument("--after", type=float, default=8.0, help="seconds watched after the cut")
    parser.add_argument("--logs", action="store_true", help="print the processes' warnings")
    args = parser.parse_args()

    procs: list[Proc] = []
    clients: list[JsClient] = []
    link = balancer = None
    try:
        broker = Proc("broker", "--bus", "tcp://127.0.0.1:0", name="broker")
        procs.append(broker)
        bus = broker.wait_ready()[0]["bus"]
        link = BusLink(bus)
        link.delay = args.delay
        edge_a = Proc("edge", "--bus", link.bus, "--port", "0", name="edgeA")
        edge_b = Proc("edge", "--bus", bus, "--port", "0", name="edgeB")
        workers = Proc("workers", "--bus", bus, "-n", "2", E2E_APP, name="workers")
        procs += [edge_a, edge_b, workers]
        urls = [p.wait_ready()[0]["http"] for p in (edge_a, edge_b)]
        workers.wait_ready(2, 15)
        ports = [int(u.rpartition(":")[2]) for u in urls]
        balancer = TcpProxy([("127.0.0.1", ports[0]), ("127.0.0.1", ports[1])])
        via_balancer = f"ws://127.0.0.1:{balancer.port}/socket"
        topic = f"echo:{uuid.uuid4().hex[:8]}"

        victims = []
        for i in range(args.victims):
            while True:   # the balancer alternates: keep the clients that landed on edge A
                client = JsClient(f"v{i}")
                clients.append(client)
                assert client.connect(via_balancer, {"user": f"v{i}"})["status"] == "open"
                if balancer.upstream_of[-1] == 0:
                    break
                client.close()
            assert client.join("c", topic)["status"] == "ok"
            victims.append(client)
        observer = JsClient("observer")
        clients.append(observer)
        assert observer.connect(urls[1].replace("http", "ws") + "/socket", {"user": "o"})["status"] == "open"
        assert observer.join("c", topic)["status"] == "ok"

        pingers = [Pinger(c) for c in [*victims, observer]]
        for p in pingers:
            p.start()
        time.sleep(2)
        cut_at = time.monotonic()
        link.freeze()
        time.sleep(args.cut)
        link.unfreeze()
        time.sleep(args.after)
        for p in pingers:
            p.stop.set()
        for p in pingers:
            p.join(15)

        print(f"cut {args.cut:g} s, delay {args.delay * 1000:g} ms, {len(victims)} victim(s)")
        for name, pinger, client in [*((f"victim{i}", p, c) for i, (p, c) in
                                       enumerate(zip(pingers, victims))),
                                     ("observer", pingers[-1], observer)]:
            served = pinger.served_again(cut_at)
            closes = [e.get("code") for e in client.find({"type": "socket_close"})]
            print(f"  {name:9s} served again after {served if served is None else round(served, 2)} s"
                  f" (cut + {None if served is None else round(served - args.cut, 2)} s);"
                  f" pushes failed {pinger.failures(cut_at)};"
                  f" chan_error {len(client.find({'type': 'chan_error'}))};"
                  f" socket closes {closes}")
        if args.logs:
            for proc in procs:
                for line in proc.stderr_text().splitlines():
                    if "INFO" not in line or "edge" in line.lower() and "down" in line:
                        print(f"  {proc.name}: {line}")
        return 0
    finally:
        for client in clients:
            client.close()
        for proc in reversed(procs):
            proc.stop()
        for proxy in (link, balancer):
            if proxy is not None:
                proxy.close()


if __name__ == "__main__":
    sys.exit(main())
