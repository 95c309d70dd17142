#!/usr/bin/env node
// zchannels load generator: many raw Phoenix V2 JSON WebSocket clients in one Node process.
//
// It speaks the wire protocol directly with `ws` (no phoenix.js), so the client side costs
// as little CPU as possible on a small machine. It is driven by bench/run.py: commands are
// JSON objects, one per line on stdin; each answer is one JSON line on stdout carrying the
// command's "id". Diagnostics go to stderr. A single command can also be given as the first
// command-line argument (JSON), in which case the process runs it and exits.
//
// Commands (fields other than "cmd"/"id" are optional, defaults shown in the code):
//   {"cmd":"open", "n":1000, "urls":["ws://127.0.0.1:P1/socket/websocket", ...],
//    "user":"bench", "join_payload":{}, "concurrency":200, "timeout_ms":600000}
//        opens n more clients spread round-robin over urls, each joins room:lobby.
//   {"cmd":"close", "keep":1000}   closes clients (newest first) until `keep` stay open.
//   {"cmd":"fanout", "msgs":200, "mode":"blast"|"paced", "gap_ms":20, "publisher":0,
//    "quiet_ms":5000, "timeout_ms":300000}
//        one client publishes "new_msg" with a performance.now() stamp in the body; every
//        joined client records publish->receive latency.
//   {"cmd":"pings", "clients":50, "offset":0, "duration_ms":10000, "count":0, "depth":1,
//    "probe_clients":0, "probe_offset":0}
//        `clients` clients keep `depth` pings in flight each (depth 1 = sequential round
//        trips); optional sequential probe clients measured separately (fairness). The result
//        counts the (non-probe) clients per edge URL in clients_by_url.
//   {"cmd":"heartbeat_all"}   heartbeat every open client and wait for the replies.
//   {"cmd":"stats"}   counters;   {"cmd":"exit"}
// The LongPoll clients (lp_* commands) are in bench/lpclient.js, the mass of idle clients of
// the maxconns phase (mc_* commands) in bench/massconns.js, the clients keeping presence lists
// (pr_* commands) in bench/presclient.js.
"use strict";

const WebSocket = require("ws");
const { performance } = require("perf_hooks");
const EXTRA = { ...require("./lpclient"), ...require("./massconns"), ...require("./presclient") };

const TOPIC = "room:lobby";
const HEARTBEAT_MS = 30000;

const conns = [];          // open (or opening) clients, in open order
let nextConnId = 0;
const counters = {
  opened: 0, open_failed: 0, joined: 0, join_failed: 0, closed_by_us: 0,
  closed_unexpectedly: 0, close_codes: {}, ws_errors: 0, http_errors: {},
  user_joined_frames: 0, other_pushes: 0, error_replies: 0, unknown_replies: 0,
  heartbeats_sent: 0, heartbeat_replies: 0, bad_frames: 0, stale_new_msg: 0,
  phx_error: 0, phx_close: 0, push_timeouts: 0,
};
const errorReasons = {};   // error reply reason -> count
function noteReason(r) { const k = String(r).slice(0, 80); errorReasons[k] = (errorReasons[k] || 0) + 1; }
let firstErrors = [];
function noteError(s) { if (firstErrors.length < 20) firstErrors.push(s); }

// ---- fan-out state (one fan-out run at a time) -------------------------------------------
let fan = null;  // {run, counts: Int32Array, lat: Float64Array, n, ...}

// ---- client ---------------------------------------------------------------------------
class Client {
  constructor(url, user, joinPayload) {
    this.id = nextConnId++;
    this.url = url;
    this.user = user;
    this.joinPayload = joinPayload;
    this.ws = null;
    this.joinRef = null;
    this.ref = 0;
    this.pending = new Map();   // ref -> callback(status, responseObj, rawString)
    this.joined = false;
    this.closing = false;
    this.isOpen = false;
    this.onClosed = null;
    this.lastSent = performance.now();
  }
  nextRef() { return String(++this.ref); }

  connect() {
    return new Promise((resolve) => {
      const sep = this.url.includes("?") ? "&" : "?";
      const url = `${this.url}${sep}user=${encodeURIComponent(this.user)}&vsn=2.0.0`;
      let settled = false;
      const ws = new WebSocket(url, { perMessageDeflate: false, skipUTF8Validation: true,
                                     handshakeTimeout: 60000 });
      this.ws = ws;
      ws.on("open", () => { this.isOpen = true; settled = true; counters.opened++; resolve(true); });
      ws.on("unexpected-response", (req, res) => {
        const k = String(res.statusCode);
        counters.http_errors[k] = (counters.http_errors[k] || 0) + 1;
        noteError(`HTTP ${res.statusCode} on upgrade`);
        req.destroy();
        if (!settled) { settled = true; counters.open_failed++; resolve(false); }
      });
      ws.on("error", (e) => {
        counters.ws_errors++;
        noteError(`ws error: ${e.message}`);
        if (!settled) { settled = true; counters.open_failed++; resolve(false); }
      });
      ws.on("close", (code) => {
        const wasOpen = this.isOpen;
        this.isOpen = false;
        this.joined = false;
        if (!this.closing && wasOpen) {
          counters.closed_unexpectedly++;
          counters.close_codes[code] = (counters.close_codes[code] || 0) + 1;
          noteError(`client ${this.id} closed by server, code ${code}`);
        }
        for (const cb of this.pending.values()) cb("closed", null, null);
        this.pending.clear();
        if (this.onClosed) this.onClosed();
      });
      ws.on("message", (data) => this.onMessage(data));
    });
  }

  wsSend(text) { this.lastSent = performance.now(); this.ws.send(text); }
  send(arr) { this.wsSend(JSON.stringify(arr)); }

  push(event, payload, cb) {
    const ref = this.nextRef();
    this.pending.set(ref, cb);
    this.wsSend(`["${this.joinRef}","${ref}","${TOPIC}","${event}",${JSON.stringify(payload)}]`);
    return ref;
  }

  join() {
    return new Promise((resolve) => {
      const ref = this.nextRef();
      this.joinRef = ref;
      this.pending.set(ref, (status, resp) => {
        if (status === "ok") { this.joined = true; counters.joined++; resolve(true); }
        else {
          counters.join_failed++;
          noteError(`join ${status}: ${JSON.stringify(resp)}`);
          resolve(false);
        }
      });
      this.send([ref, ref, TOPIC, "phx_join", this.joinPayload]);
    });
  }

  heartbeat(done) {
    if (!this.isOpen) { if (done) done("closed"); return; }
    const ref = this.nextRef();
    this.pending.set(ref, (status) => { if (status === "ok") counters.heartbeat_replies++; if (done) done(status); });
    this.wsSend(`[null,"${ref}","phoenix","heartbeat",{}]`);
    counters.heartbeats_sent++;
  }

  onMessage(data) {
    const s = typeof data === "string" ? data : data.toString("utf8");
    // Fast path: a fan-out broadcast [null,null,"room:lobby","new_msg",{"body":"B:seq:t",...}]
    // (on a topic keeping history, its position "<epoch>:<offset>" is in the ref slot)
    if (s.startsWith('[null,null,"room:lobby","new_msg"') ||
        (s.startsWith('[null,"') && s.startsWith('","room:lobby","new_msg"', s.indexOf('"', 7)))) {
      const now = performance.now();
      const i = s.indexOf('"B:');
      if (i < 0 || fan === null) { counters.stale_new_msg++; return; }
      const k = s.indexOf('"', i + 3);
      const parts = s.slice(i + 3, k).split(":");  // run, seq, t
      const r = +parts[0], seq = +parts[1], t = +parts[2];
      if (r !== fan.run || !(seq >= 0 && seq < fan.msgs)) { counters.stale_new_msg++; return; }
      fan.counts[seq]++;
      if (fan.nlat < fan.lat.length) fan.lat[fan.nlat++] = now - t;
      fan.received++;
      fan.lastRecv = now;
      if (fan.onDelivery) fan.onDelivery(seq);
      return;
    }
    let msg;
    try { msg = JSON.parse(s); } catch (e) { counters.bad_frames++; noteError(`bad frame ${s.slice(0, 80)}`); return; }
    if (!Array.isArray(msg) || msg.length < 5) { counters.bad_frames++; return; }
    const [joinRef, ref, topic, event, payload] = msg;
    if (event === "phx_reply") {
      const cb = ref !== null ? this.pending.get(ref) : undefined;
      if (cb === undefined) { counters.unknown_replies++; return; }
      this.pending.delete(ref);
      const status = payload && payload.status;
      if (status !== "ok" && topic !== "phoenix") {
        counters.error_replies++;
        noteReason(payload && payload.response && payload.response.reason);
        noteError(`error reply ${s.slice(0, 160)}`);
      }
      cb(status, payload && payload.response, s);
    } else if (event === "user_joined") {
      counters.user_joined_frames++;
    } else if (event === "new_msg") {
      counters.stale_new_msg++;
    } else if ((event === "phx_error" || event === "phx_close") && joinRef === this.joinRef) {
      // The channel died (phoenix.js would rejoin): pushes in flight get no reply.
      counters[event]++;
      noteError(`${event} on ${topic}: ${s.slice(0, 120)}`);
      this.joined = false;
      for (const [r, cb] of this.pending) {
        if (r !== this.joinRef) { this.pending.delete(r); cb(event, null, null); }
      }
    } else {
      counters.other_pushes++;
    }
  }

  close() {
    return new Promise((resolve) => {
      if (!this.ws || this.ws.readyState === WebSocket.CLOSED) { resolve(); return; }
      this.closing = true;
      counters.closed_by_us++;
      const timer = setTimeout(() => { try { this.ws.terminate(); } catch (e) {} resolve(); }, 5000);
      this.onClosed = () => { clearTimeout(timer); resolve(); };
      try { this.ws.close(1000); } catch (e) { clearTimeout(timer); resolve(); }
    });
  }
}

// ---- helpers --------------------------------------------------------------------------
function pct(sorted, p) {
  if (sorted.length === 0) return null;
  const idx = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1));
  return sorted[idx];
}
function summarize(arr, n) {
  const a = Float64Array.from(arr.subarray ? arr.subarray(0, n) : arr.slice(0, n));
  a.sort();
  const r3 = (x) => x === null ? null : Math.round(x * 1000) / 1000;
  let sum = 0; for (let i = 0; i < a.length; i++) sum += a[i];
  return { n: a.length, p50_ms: r3(pct(a, 50)), p90_ms: r3(pct(a, 90)), p99_ms: r3(pct(a, 99)),
           max_ms: r3(a.length ? a[a.length - 1] : null), mean_ms: r3(a.length ? sum / a.length : null) };
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function joinedClients() { return conns.filter((c) => c.joined && c.isOpen); }

// Heartbeats: the server closes clients that sent nothing for 60 s. Every client that has
// sent nothing for 25 s gets a heartbeat (checked each second). run.py calls "heartbeat_all"
// right before a measured phase, so phases shorter than 25 s carry no heartbeat traffic.
let hbTimer = null;
function startHeartbeats() {
  if (hbTimer) return;
  hbTimer = setInterval(() => {
    const now = performance.now();
    let sent = 0;
    for (const c of conns) {
      if (c.isOpen && now - c.lastSent > 25000) { c.heartbeat(); if (++sent >= 2000) break; }
    }
  }, 1000);
  hbTimer.unref();
}

async function cmdHeartbeatAll(o) {
  const t0 = performance.now();
  const open = conns.filter((c) => c.isOpen);
  const ok = await Promise.all(open.map((c) => new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), o.timeout_ms ?? 30000);
    c.heartbeat((status) => { clearTimeout(timer); resolve(status === "ok"); });
  })));
  return { sent: open.length, replied_ok: ok.filter(Boolean).length,
           elapsed_ms: Math.round(performance.now() - t0) };
}

// ---- commands -------------------------------------------------------------------------
async function cmdOpen(o) {
  const n = o.n ?? 1000, urls = o.urls, user = o.user ?? "bench";
  const joinPayload = o.join_payload ?? {}, conc = o.concurrency ?? 200;
  const deadline = performance.now() + (o.timeout_ms ?? 600000);
  if (!urls || urls.length === 0) throw new Error("open: urls required");
  const before = { opened: counters.opened, joined: counters.joined,
                   open_failed: counters.open_failed, join_failed: counters.join_failed };
  startHeartbeats();
  const t0 = performance.now();
  const connectLat = new Float64Array(n), joinLat = new Float64Array(n);
  let nc = 0, nj = 0, started = 0;
  const base = conns.length;
  async function one(i) {
    const c = new Client(urls[(base + i) % urls.length], user, joinPayload);
    conns.push(c);
    const a = performance.now();
    if (!(await c.connect())) return;
    const b = performance.now();
    connectLat[nc++] = b - a;
    if (await c.join()) joinLat[nj++] = performance.now() - b;
  }
  async function lane() {
    while (started < n && performance.now() < deadline) { const i = started++; await one(i); }
  }
  const lanes = [];
  for (let k = 0; k < Math.min(conc, n); k++) lanes.push(lane());
  await Promise.all(lanes);
  const elapsed = performance.now() - t0;
  return {
    requested: n, elapsed_ms: Math.round(elapsed),
    opened: counters.opened - before.opened, joined: counters.joined - before.joined,
    open_failed: counters.open_failed - before.open_failed,
    join_failed: counters.join_failed - before.join_failed,
    joins_per_s: Math.round((counters.joined - before.joined) / (elapsed / 1000)),
    connect_latency: summarize(connectLat, nc), join_latency: summarize(joinLat, nj),
    total_joined: joinedClients().length, total_open: conns.filter((c) => c.isOpen).length,
  };
}

async function cmdClose(o) {
  const keep = o.keep ?? 0;
  const t0 = performance.now();
  const victims = conns.splice(keep);
  const CH = 500;
  for (let i = 0; i < victims.length; i += CH) await Promise.all(victims.slice(i, i + CH).map((c) => c.close()));
  return { closed: victims.length, elapsed_ms: Math.round(performance.now() - t0),
           total_joined: joinedClients().length };
}

let fanRun = 0;
async function cmdFanout(o) {
  const msgs = o.msgs ?? 200, mode = o.mode ?? "blast", gap = o.gap_ms ?? 20;
  const quiet = o.quiet_ms ?? 5000, hard = performance.now() + (o.timeout_ms ?? 300000);
  const subs = joinedClients();
  const expectedPer = subs.length;
  const pub = subs[o.publisher ?? 0];
  if (!pub) throw new Error("fanout: no joined client");
  const run = (++fanRun) % 10;   // one digit, checked by the fast path
  fan = { run, msgs, counts: new Int32Array(msgs), lat: new Float64Array(msgs * expectedPer),
          nlat: 0, received: 0, lastRecv: 0, onDelivery: null };
  const pubErrors = [];
  // "new_msg" is answered with noreply: the callbacks only fire if the channel errors or closes.
  const pubRefs = [];
  const publish = (seq) => {
    const body = `B:${run}:${seq}:${performance.now().toFixed(3)}`;
    pubRefs.push(pub.push("new_msg", { body }, (status, resp) => { if (status !== "ok") pubErrors.push(status); }));
  };
  const t0 = performance.now();
  let perMsgMs = [];
  if (mode === "blast") {
    for (let s = 0; s < msgs; s++) publish(s);
    const total = msgs * expectedPer;
    while (fan.received < total && performance.now() < hard) {
      const last = Math.max(fan.lastRecv, t0);
      if (performance.now() - last > quiet) break;
      await sleep(5);
    }
  } else {  // paced: one broadcast in flight; next one after all copies arrived (or quiet) + gap
    for (let s = 0; s < msgs && performance.now() < hard; s++) {
      const ts = performance.now();
      await new Promise((resolve) => {
        let done = false;
        const finish = () => { if (!done) { done = true; fan.onDelivery = null; clearInterval(iv); resolve(); } };
        fan.onDelivery = (seq) => { if (seq === s && fan.counts[s] >= expectedPer) finish(); };
        const iv = setInterval(() => {
          const last = Math.max(fan.lastRecv, ts);
          if (fan.counts[s] >= expectedPer || performance.now() - last > quiet || performance.now() > hard) finish();
        }, 10);
        publish(s);
      });
      perMsgMs.push(Math.round((performance.now() - ts) * 1000) / 1000);
      if (gap > 0) await sleep(gap);
    }
    // late stragglers
    const endWait = performance.now() + 200;
    while (performance.now() < endWait && fan.received < msgs * expectedPer) await sleep(10);
  }
  const lastRecv = fan.lastRecv || performance.now();
  const span = lastRecv - t0;
  const expected = msgs * expectedPer;
  let dup = 0, msgsIncomplete = 0;
  for (let s = 0; s < msgs; s++) {
    if (fan.counts[s] > expectedPer) dup += fan.counts[s] - expectedPer;
    if (fan.counts[s] < expectedPer) msgsIncomplete++;
  }
  const res = {
    mode, subscribers: expectedPer, msgs, expected, received: fan.received,
    lost: Math.max(0, expected - fan.received), duplicates: dup, msgs_incomplete: msgsIncomplete,
    span_ms: Math.round(span * 1000) / 1000,
    deliveries_per_s: span > 0 ? Math.round(fan.received / (span / 1000)) : null,
    latency: summarize(fan.lat, fan.nlat), publish_errors: pubErrors.length,
    still_joined: joinedClients().length,
  };
  if (mode !== "blast") {
    const a = perMsgMs.slice().sort((x, y) => x - y);
    res.per_broadcast_complete_ms = { p50: pct(a, 50), max: a.length ? a[a.length - 1] : null };
  }
  fan = null;
  for (const r of pubRefs) pub.pending.delete(r);
  return res;
}

async function cmdPings(o) {
  const nC = o.clients ?? 50, off = o.offset ?? 0, depth = o.depth ?? 1;
  const nP = o.probe_clients ?? 0, poff = o.probe_offset ?? (off + nC);
  const durMs = o.duration_ms ?? 10000, count = o.count ?? 0;   // count: pings per client (0 = time-bound)
  const hardMs = Math.max(durMs, 1000) + 60000;
  const joined = joinedClients();
  if (joined.length < Math.max(off + nC, nP ? poff + nP : 0)) throw new Error(`pings: only ${joined.length} joined clients`);
  const workers = joined.slice(off, off + nC), probes = nP ? joined.slice(poff, poff + nP) : [];
  const lat = [], plat = [];
  const pushTimeoutMs = o.push_timeout_ms ?? 10000;   // phoenix.js default push timeout
  let errors = 0, closed = 0, timeouts = 0, chanErrors = 0, stoppedClients = 0;
  const t0 = performance.now();
  const stopAt = count > 0 ? t0 + hardMs : t0 + durMs;
  const payload = { q: "ping" };
  // A client stops at its first failed push (error reply, channel error, timeout, close),
  // so one broken channel does not turn into a storm of instant error replies.
  function driver(c, sink, d, limit) {
    return new Promise((resolve) => {
      let inflight = 0, sent = 0, failed = false, done = false;
      const finish = () => { if (!done) { done = true; if (failed) stoppedClients++; resolve(); } };
      const fire = () => {
        while (!failed && inflight < d && performance.now() < stopAt && (limit === 0 || sent < limit)
               && c.isOpen && c.joined) {
          const ts = performance.now();
          inflight++; sent++;
          let answered = false;
          const ref = c.push("ping", payload, (status) => {
            if (answered) return;
            answered = true;
            clearTimeout(timer);
            inflight--;
            if (status === "ok") sink.push(performance.now() - ts);
            else {
              failed = true;
              if (status === "closed") closed++;
              else if (status === "timeout") timeouts++;
              else if (status === "phx_error" || status === "phx_close") chanErrors++;
              else errors++;
            }
            if (failed || performance.now() >= stopAt || (limit > 0 && sent >= limit) || !c.isOpen) {
              if (inflight === 0) finish();
            } else fire();
          });
          const timer = setTimeout(() => {
            const cb = c.pending.get(ref);
            if (cb) { c.pending.delete(ref); counters.push_timeouts++; cb("timeout"); }
          }, pushTimeoutMs);
        }
        if (inflight === 0) finish();
      };
      fire();
    });
  }
  const hardTimer = sleep(hardMs + pushTimeoutMs + 5000).then(() => "timeout");
  const all = Promise.all([...workers.map((c) => driver(c, lat, depth, count)),
                           ...probes.map((c) => driver(c, plat, 1, count))]);
  const outcome = await Promise.race([all, hardTimer]);
  const el = performance.now() - t0;
  const res = { clients: nC, depth, elapsed_ms: Math.round(el), round_trips: lat.length,
                round_trips_per_s: Math.round(lat.length / (el / 1000)), latency: summarize(lat, lat.length),
                errors, closed, push_timeouts: timeouts, channel_errors: chanErrors,
                clients_stopped_by_failure: stoppedClients, timed_out: outcome === "timeout",
                clients_by_url: {} };
  for (const c of workers) res.clients_by_url[c.url] = (res.clients_by_url[c.url] || 0) + 1;
  if (nP) {
    res.probe_clients = nP; res.probe_round_trips = plat.length;
    res.probe_latency = summarize(plat, plat.length);
    res.total_round_trips_per_s = Math.round((lat.length + plat.length) / (el / 1000));
  }
  return res;
}

function cmdStats() {
  return { counters, error_reasons: errorReasons, first_errors: firstErrors, conns: conns.length,
           open: conns.filter((c) => c.isOpen).length, joined: joinedClients().length,
           cpu_us: process.cpuUsage(), rss_kb: Math.round(process.memoryUsage().rss / 1024) };
}

async function handle(o) {
  switch (o.cmd) {
    case "open": return cmdOpen(o);
    case "close": return cmdClose(o);
    case "fanout": return cmdFanout(o);
    case "pings": return cmdPings(o);
    case "stats": return cmdStats();
    case "heartbeat_all": return cmdHeartbeatAll(o);
    case "exit": return { bye: true };
    default:
      if (Object.hasOwn(EXTRA, o.cmd)) return EXTRA[o.cmd](o);
      throw new Error(`unknown cmd ${o.cmd}`);
  }
}

function reply(o, res, err) {
  const out = { id: o.id ?? null, cmd: o.cmd, ok: !err };
  if (err) out.error = String(err && err.stack || err); else out.result = res;
  process.stdout.write(JSON.stringify(out) + "\n");
}

async function main() {
  if (process.argv[2]) {   // one-shot mode: node loadgen.js '{"cmd":...}' (a list runs in order)
    const cmds = [].concat(JSON.parse(process.argv[2]));
    for (const o of cmds) {
      try { reply(o, await handle(o)); } catch (e) { reply(o, null, e); }
    }
    await cmdClose({ keep: 0 });
    process.exit(0);
  }
  const rl = require("readline").createInterface({ input: process.stdin });
  let chain = Promise.resolve();
  rl.on("line", (line) => {
    line = line.trim();
    if (!line) return;
    let o;
    try { o = JSON.parse(line); } catch (e) { reply({}, null, `bad command JSON: ${e}`); return; }
    chain = chain.then(async () => {
      try { reply(o, await handle(o)); } catch (e) { reply(o, null, e); }
      if (o.cmd === "exit") { await cmdClose({ keep: 0 }); process.exit(0); }
    });
  });
  rl.on("close", () => { chain.then(() => cmdClose({ keep: 0 })).then(() => process.exit(0)); });
}

main();
