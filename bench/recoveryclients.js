#!/usr/bin/env node
// Clients for bench/recovery.py: raw Phoenix V2 JSON WebSocket clients (the `ws` package, no
// phoenix.js, so the client side costs little CPU) that track their position on one topic the
// way zchannels-recovery.js does and name it as zc_since when they join again.
//
// stdin: one JSON command per line with an "id"; stdout: one JSON answer per line with that id.
//   {"cmd":"open", "n":1000, "url":"ws://127.0.0.1:P/socket/websocket", "topic":"room:lobby"}
//        n clients connect and join (no zc_since: status "new"); answers when all have joined.
//   {"cmd":"wait_closed", "timeout_ms":10000}   answers when every client's socket is closed.
//   {"cmd":"rejoin", "url":..., "head":"<epoch>:<offset>", "timeout_ms":60000}
//        every client connects again at once and joins with zc_since = its last position;
//        answers when every client has received up to `head`'s offset (or at the timeout):
//        ms until the last one caught up, p50/p99 per client, recovery statuses, gaps,
//        duplicates (offsets out of order) and broadcasts received.
//   {"cmd":"stats"}, {"cmd":"exit"}
"use strict";

const WebSocket = require("ws");
const { performance } = require("perf_hooks");
const readline = require("readline");

const POSITION = /^([a-z0-9]+):([0-9]+)$/;
const clients = [];
const counters = { gaps: 0, duplicates: 0, broadcasts: 0, statuses: {}, errors: [], closed: 0 };

function note(msg) { if (counters.errors.length < 20) counters.errors.push(msg); }

class Client {
  constructor(topic) {
    this.topic = topic;
    this.epoch = "";
    this.offset = 0;
    this.ref = 0;
    this.ws = null;
    this.open = false;
    this.onProgress = null;
  }

  connect(url, since) {
    return new Promise((resolve) => {
      const ws = new WebSocket(`${url}?vsn=2.0.0&user=rec`, { perMessageDeflate: false, handshakeTimeout: 60000 });
      this.ws = ws;
      ws.on("open", () => {
        this.open = true;
        const ref = String(++this.ref);
        const params = since ? { zc_since: since } : {};
        ws.send(JSON.stringify([ref, ref, this.topic, "phx_join", params]));
      });
      ws.on("message", (data) => {
        const msg = JSON.parse(data.toString("utf8"));
        const [, ref, , event, payload] = msg;
        if (event === "phx_reply") {
          if (payload.status !== "ok") note(`join answered ${JSON.stringify(payload)}`);
          resolve(payload.status === "ok");
        } else if (event === "zc_recovery") {
          const s = payload.status;
          counters.statuses[s] = (counters.statuses[s] || 0) + 1;
          if (s !== "recovered") this.take(payload.position, false);
          if (s === "not_recovered") note(`not recovered: ${payload.reason}`);
        } else if (typeof ref === "string" && POSITION.test(ref)) {
          counters.broadcasts++;
          this.take(ref, true);
        }
      });
      ws.on("error", (e) => { note(`ws error ${e.message}`); resolve(false); });
      ws.on("close", () => { if (this.open) counters.closed++; this.open = false; resolve(false); });
    });
  }

  take(position, check) {
    const [, epoch, off] = POSITION.exec(position);
    const offset = +off;
    const same = epoch === this.epoch;
    if (check && same) {
      if (offset <= this.offset) counters.duplicates++;
      else if (offset > this.offset + 1) counters.gaps++;
    }
    this.offset = same ? Math.max(this.offset, offset) : offset;
    this.epoch = epoch;
    if (this.onProgress) this.onProgress(this);
  }

  since() { return this.epoch ? `${this.epoch}:${this.offset}` : ""; }
}

function pct(sorted, p) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p / 100))] : null;
}

const commands = {
  async open(o) {
    const t0 = performance.now();
    const made = [];
    for (let i = 0; i < o.n; i++) made.push(new Client(o.topic || "room:lobby"));
    const CH = o.concurrency || 200;
    let joined = 0;
    for (let i = 0; i < made.length; i += CH) {
      const ok = await Promise.all(made.slice(i, i + CH).map((c) => c.connect(o.url, "")));
      joined += ok.filter(Boolean).length;
    }
    clients.push(...made);
    return { joined, ms: Math.round(performance.now() - t0) };
  },

  async wait_closed(o) {
    const end = performance.now() + (o.timeout_ms || 10000);
    while (clients.some((c) => c.open) && performance.now() < end) await sleep(20);
    return { still_open: clients.filter((c) => c.open).length };
  },

  async rejoin(o) {
    const target = +POSITION.exec(o.head)[2];
    const epoch = POSITION.exec(o.head)[1];
    const t0 = performance.now();
    const done = new Array(clients.length).fill(null);
    let left = clients.length;
    const finished = new Promise((resolve) => {
      clients.forEach((c, i) => {
        c.onProgress = (cl) => {
          if (done[i] === null && cl.epoch === epoch && cl.offset >= target) {
            done[i] = performance.now() - t0;
            if (--left === 0) resolve();
          }
        };
      });
      setTimeout(resolve, o.timeout_ms || 60000);
    });
    const before = counters.broadcasts;
    await Promise.all(clients.map((c) => c.connect(o.url, c.since())));
    const joinedMs = performance.now() - t0;
    await finished;
    for (const c of clients) c.onProgress = null;
    const times = done.filter((x) => x !== null).sort((a, b) => a - b);
    return { clients: clients.length, caught_up: times.length,
             all_caught_up_ms: times.length === clients.length ? Math.round(times[times.length - 1]) : null,
             all_joined_ms: Math.round(joinedMs), p50_ms: Math.round(pct(times, 50)),
             p99_ms: Math.round(pct(times, 99)), broadcasts: counters.broadcasts - before,
             statuses: counters.statuses, gaps: counters.gaps, duplicates: counters.duplicates,
             errors: counters.errors.slice(0, 5) };
  },

  async stats() { return counters; },
  async exit() { setTimeout(() => process.exit(0), 10); return { bye: true }; },
};

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on("line", async (line) => {
  if (!line.trim()) return;
  const o = JSON.parse(line);
  try {
    const out = await commands[o.cmd](o);
    process.stdout.write(JSON.stringify({ id: o.id, ok: true, ...out }) + "\n");
  } catch (e) {
    process.stdout.write(JSON.stringify({ id: o.id, ok: false, error: String(e && e.stack || e) }) + "\n");
  }
});
