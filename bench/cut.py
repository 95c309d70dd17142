"""How long a cut of a bus link keeps the clients concerned out of service.

A broker, two workers and two edges: edge A reaches the broker through a TCP proxy
(tests/tcpproxy.py) that the run freezes for ``--cut`` seconds, edge B directly (with
``--side workers`` the workers' link is the one cut).  Victim clients (phoenix.js) connect
through a round-robin TCP balancer in front of A and B and land on A; an observer connects to
B.  Each client pushes ``ping`` (1 s timeout) every 200 ms.

With ``--netns`` the cut is a real one: the run re-executes itself in a private network
namespace (``unshare -rn``; no traffic leaves it), puts edge A (or the workers) in a second
namespace joined by a veth pair for the bus and another for the clients, and takes the bus
veth down for the cut, so the kernel drops the packets and TCP retransmits with its doubling
backoff, as between machines (the proxy cannot show that: loopback acknowledges everything).

Printed per client: seconds from the start of the cut until a push sent after it was answered
ok ("served again"), pushes timed out or refused, channel errors and socket closes seen.

    .venv/bin/python bench/cut.py --cut 10 --victims 2
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
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
    parser.add_argument("--side", choices=["edge", "workers"], default="edge",
                        help="whose link is cut: edge A's, or the workers' (then every client is "
                             "a victim, connected to edge A)")
    parser.add_argument("--netns", action="store_true", help="a real cut between network namespaces")
    parser.add_argument("--keep-clients", action="store_true",
                        help="edge A keeps its clients while the bus is down (--bus-loss-timeout 0)")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.netns and not args.in_netns:
        os.execvp("unshare", ["unshare", "-rn", sys.executable, *sys.argv, "--in-netns"])

    procs: list[Proc] = []
    clients: list[JsClient] = []
    link = balancer = None
    try:
        net = Namespaces() if args.netns else None
        broker = Proc("zchannels.broker", "--bus", "tcp://0.0.0.0:0" if net else "tcp://127.0.0.1:0", name="broker")
        procs.append(broker)
        bus = broker.wait_ready()[0]["bus"].replace("0.0.0.0", "127.0.0.1")
        if net:
            far_bus = bus.replace("127.0.0.1", Namespaces.BUS_NEAR)
            link = net
        else:
            link = BusLink(bus)
            link.delay = args.delay
            far_bus = link.bus
        keep = ["--bus-loss-timeout", "0"] if args.keep_clients else []
        edge_a = (net.proc("edge", "--bus", far_bus, "--port", "0", "--host", "0.0.0.0", *keep, name="edgeA")
                  if net and args.side == "edge" else
                  Proc("zchannels.edge", "--bus", far_bus if args.side == "edge" else bus, "--port", "0", *keep,
                       name="edgeA"))
        edge_b = Proc("zchannels.edge", "--bus", bus, "--port", "0", name="edgeB")
        workers = (net.proc("workers", "--bus", far_bus, "-n", "2", E2E_APP, name="workers")
                   if net and args.side == "workers" else
                   Proc("zchannels.workers", "--bus", far_bus if args.side == "workers" else bus, "-n", "2",
                        E2E_APP, name="workers"))
        procs += [edge_a, edge_b, workers]
        urls = [p.wait_ready()[0]["http"] for p in (edge_a, edge_b)]
        workers.wait_ready(2, 15)
        ports = [int(u.rpartition(":")[2]) for u in urls]
        host_a = Namespaces.CLIENT_FAR if net and args.side == "edge" else "127.0.0.1"
        balancer = TcpProxy([(host_a, ports[0]), ("127.0.0.1", ports[1])])
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
        cut_at, cut_wall = time.monotonic(), time.time()
        link.freeze()
        time.sleep(args.cut)
        link.unfreeze()
        time.sleep(args.after)
        for p in pingers:
            p.stop.set()
        for p in pingers:
            p.join(15)

        print(f"cut {args.cut:g} s of the {args.side} link, delay {args.delay * 1000:g} ms, "
              f"{len(victims)} client(s) on edge A")
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
        back = bus_back(edge_a if args.side == "edge" else workers, cut_wall)
        print(f"  the cut side heard the broker again {back} s after the cut began")
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


def bus_back(proc: Proc, since: float) -> float | None:
    """Seconds from ``since`` (wall clock) to the process's first "broker ... again" log line."""
    for line in proc.stderr_text().splitlines():
        if "reachable again" in line or "answering again" in line:
            stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000
            if stamp >= since:
                return round(stamp - since, 2)
    return None


class Namespaces:
    """A second network namespace, joined to ours by a veth pair for the bus and one for clients."""
    BUS_NEAR, BUS_FAR = "10.9.0.1", "10.9.0.2"
    CLIENT_NEAR, CLIENT_FAR = "10.8.0.1", "10.8.0.2"

    def __init__(self) -> None:
        run = lambda *cmd: subprocess.run(cmd, check=True)   # noqa: E731
        run("ip", "link", "set", "lo", "up")
        self.holder = subprocess.Popen(["unshare", "-n", "sleep", "3600"])
        time.sleep(0.2)
        pid = str(self.holder.pid)
        far = ("nsenter", "-t", pid, "-n")
        run(*far, "ip", "link", "set", "lo", "up")
        for near_if, far_if, near, far_addr in (("bus0", "bus1", self.BUS_NEAR, self.BUS_FAR),
                                                ("cli0", "cli1", self.CLIENT_NEAR, self.CLIENT_FAR)):
            run("ip", "link", "add", near_if, "type", "veth", "peer", "name", far_if, "netns", pid)
            run("ip", "addr", "add", f"{near}/24", "dev", near_if)
            run("ip", "link", "set", near_if, "up")
            run(*far, "ip", "addr", "add", f"{far_addr}/24", "dev", far_if)
            run(*far, "ip", "link", "set", far_if, "up")
        fd, self.wrapper = tempfile.mkstemp(suffix=".sh")
        os.write(fd, f"#!/bin/sh\nexec nsenter -t {pid} -n {sys.executable} \"$@\"\n".encode())
        os.close(fd)
        os.chmod(self.wrapper, 0o755)

    def proc(self, module: str, *args: str, name: str) -> Proc:
        """A process in the far namespace."""
        real, sys.executable = sys.executable, self.wrapper
        try:
            return Proc(module, *args, name=name)
        finally:
            sys.executable = real

    def freeze(self) -> None:
        subprocess.run(["ip", "link", "set", "bus0", "down"], check=True)

    def unfreeze(self) -> None:
        subprocess.run(["ip", "link", "set", "bus0", "up"], check=True)

    def close(self) -> None:
        self.holder.kill()
        os.unlink(self.wrapper)


if __name__ == "__main__":
    sys.exit(main())
