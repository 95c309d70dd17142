"""The floor of three request paths between an edge and a worker, in bare pyzmq (no Phoenix,
no handler): CPU per request -> reply with W requests in flight, one process per role.

  router : edge DEALER -> broker ROUTER (a Python loop that readdresses) -> worker DEALER, and
           back: the path of today (broker/router.py)
  proxy  : edge PUB -> the broker's XSUB/XPUB proxy (C) -> worker SUB subscribed to its own id,
           and back through the same proxy to the edge's id
  direct : edge DEALER -> a ROUTER the worker binds, and back; no broker

Each side drains its socket in batches (NOBLOCK until EAGAIN), as bus/loopsock.py does.

    N=60000 W=8 .venv/bin/python bench/request_paths.py [router|proxy|direct ...]

Prints, per path, round trips/s and the CPU (user + system) of each process per round trip.
"""
import multiprocessing as mp
import os
import resource
import sys
import threading
import time

import zmq

N = int(os.environ.get("N", "100000"))
WINDOW = int(os.environ.get("W", "400"))
BASE = int(os.environ.get("PORT", "36100"))
PAYLOAD = b'{"body":"hello"}'
EDGE_ID, WORKER_ID = b"E1", b"W1"


def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def broker_router(ready, stop, stop_cpu):
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.SNDHWM, 0); r.setsockopt(zmq.RCVHWM, 0)
    r.bind(f"tcp://127.0.0.1:{BASE}")
    ready.set()
    poller = zmq.Poller(); poller.register(r, zmq.POLLIN)
    t0 = cpu()
    while not stop.is_set():
        if not poller.poll(100):
            continue
        while True:
            try:
                sender, data = r.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            # data: dest_len | dest | body ; readdress to sender
            n = data[0]
            dest = data[1:1 + n]
            r.send_multipart([dest, bytes((len(sender),)) + sender + data[1 + n:]], zmq.NOBLOCK)
    stop_cpu.value = cpu() - t0


def broker_proxy(ready, stop, stop_cpu):
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB); xsub.setsockopt(zmq.RCVHWM, 0); xsub.bind(f"tcp://127.0.0.1:{BASE + 1}")
    xpub = ctx.socket(zmq.XPUB); xpub.setsockopt(zmq.SNDHWM, 0); xpub.bind(f"tcp://127.0.0.1:{BASE + 2}")
    ctl = ctx.socket(zmq.PAIR); ctl.bind("inproc://ctl")
    ready.set()
    t = threading.Thread(target=lambda: zmq.proxy_steerable(xsub, xpub, None, ctl_peer), daemon=True)
    ctl_peer = ctx.socket(zmq.PAIR); ctl_peer.connect("inproc://ctl")
    t0 = cpu()
    t.start()
    stop.wait()
    stop_cpu.value = cpu() - t0
    os._exit(0)


def worker(mode, ready, stop, out):
    ctx = zmq.Context()
    if mode == "router":
        d = ctx.socket(zmq.DEALER); d.setsockopt(zmq.IDENTITY, WORKER_ID)
        d.setsockopt(zmq.SNDHWM, 0); d.setsockopt(zmq.RCVHWM, 0)
        d.connect(f"tcp://127.0.0.1:{BASE}")
        d.send(b"\x00")  # register identity
        socks = [d]
    elif mode == "proxy":
        sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.RCVHWM, 0); sub.connect(f"tcp://127.0.0.1:{BASE + 2}")
        sub.setsockopt(zmq.SUBSCRIBE, b"\x00" + WORKER_ID + b"\x00")
        pub = ctx.socket(zmq.PUB); pub.setsockopt(zmq.SNDHWM, 0); pub.connect(f"tcp://127.0.0.1:{BASE + 1}")
        socks = [sub]
    else:
        r = ctx.socket(zmq.ROUTER); r.setsockopt(zmq.SNDHWM, 0); r.setsockopt(zmq.RCVHWM, 0)
        r.bind(f"tcp://127.0.0.1:{BASE + 3}")
        socks = [r]
    ready.set()
    poller = zmq.Poller(); poller.register(socks[0], zmq.POLLIN)
    t0 = cpu()
    s = socks[0]
    while not stop.is_set():
        if not poller.poll(100):
            continue
        while True:
            try:
                if mode == "direct":
                    ident, data = s.recv_multipart(zmq.NOBLOCK)
                else:
                    data = s.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if mode == "router":
                if len(data) < 2:
                    continue
                n = data[0]; sender = data[1:1 + n]; body = data[1 + n:]
                s.send(bytes((len(sender),)) + sender + body, zmq.NOBLOCK)
            elif mode == "proxy":
                _, _me, sender, body = data.split(b"\x00", 3)
                pub.send(b"\x00" + sender + b"\x00" + body, zmq.NOBLOCK)
            else:
                s.send_multipart([ident, data], zmq.NOBLOCK)
    out.value = cpu() - t0


def edge(mode, ready, result):
    ctx = zmq.Context()
    if mode == "router":
        d = ctx.socket(zmq.DEALER); d.setsockopt(zmq.IDENTITY, EDGE_ID)
        d.setsockopt(zmq.SNDHWM, 0); d.setsockopt(zmq.RCVHWM, 0)
        d.connect(f"tcp://127.0.0.1:{BASE}")
        send = lambda body: d.send(bytes((len(WORKER_ID),)) + WORKER_ID + body, zmq.NOBLOCK)
        rs = d
    elif mode == "proxy":
        sub = ctx.socket(zmq.SUB); sub.setsockopt(zmq.RCVHWM, 0); sub.connect(f"tcp://127.0.0.1:{BASE + 2}")
        sub.setsockopt(zmq.SUBSCRIBE, b"\x00" + EDGE_ID + b"\x00")
        pub = ctx.socket(zmq.PUB); pub.setsockopt(zmq.SNDHWM, 0); pub.connect(f"tcp://127.0.0.1:{BASE + 1}")
        send = lambda body: pub.send(b"\x00" + WORKER_ID + b"\x00" + EDGE_ID + b"\x00" + body, zmq.NOBLOCK)
        rs = sub
    else:
        d = ctx.socket(zmq.DEALER); d.setsockopt(zmq.SNDHWM, 0); d.setsockopt(zmq.RCVHWM, 0)
        d.connect(f"tcp://127.0.0.1:{BASE + 3}")
        send = lambda body: d.send(body, zmq.NOBLOCK)
        rs = d
    time.sleep(0.5)   # subscriptions / connects settle
    poller = zmq.Poller(); poller.register(rs, zmq.POLLIN)
    t0, w0 = cpu(), time.monotonic()
    sent = got = 0
    while sent < min(WINDOW, N):
        send(PAYLOAD); sent += 1
    while got < N:
        if not poller.poll(2000):
            print("stalled", mode, got, file=sys.stderr); break
        while True:
            try:
                rs.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            got += 1
            if sent < N:
                send(PAYLOAD); sent += 1
    result[0] = cpu() - t0
    result[1] = time.monotonic() - w0
    result[2] = got


if __name__ == "__main__":
    for mode in sys.argv[1:] or ["router", "proxy", "direct"]:
        stop = mp.Event(); ready_b = mp.Event(); ready_w = mp.Event()
        stop_cpu = mp.Value("d", 0.0); wcpu = mp.Value("d", 0.0); res = mp.Array("d", 3)
        procs = []
        if mode == "router":
            procs.append(mp.Process(target=broker_router, args=(ready_b, stop, stop_cpu)))
        elif mode == "proxy":
            procs.append(mp.Process(target=broker_proxy, args=(ready_b, stop, stop_cpu)))
        else:
            ready_b.set()
        for p in procs: p.start()
        ready_b.wait(5)
        wp = mp.Process(target=worker, args=(mode, ready_w, stop, wcpu)); wp.start(); ready_w.wait(5)
        ep = mp.Process(target=edge, args=(mode, ready_w, res)); ep.start(); ep.join()
        stop.set(); wp.join(5)
        for p in procs: p.join(5)
        n = res[2] or 1
        total = res[0] + wcpu.value + stop_cpu.value
        print(f"{mode:7s} W={WINDOW}: {n:.0f} round trips in {res[1]:.2f}s = {n / res[1]:,.0f}/s; CPU per round trip: "
              f"edge {res[0] / n * 1e6:.1f} us, worker {wcpu.value / n * 1e6:.1f} us, broker {stop_cpu.value / n * 1e6:.1f} us, "
              f"total {total / n * 1e6:.1f} us")
