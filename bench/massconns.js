"use strict";
// Many idle joined WebSocket clients for bench/loadgen.js (phase "maxconns", docs/benchmarks.md).
//
// One Node process holds at most RLIMIT_NOFILE sockets (20,000 here), so run.py starts several
// load generators and each holds its share. A client is as small as we can make it: a `ws`
// socket that joins room:lobby, heartbeats every 25 s and counts the broadcasts it receives.
// Clients are spread round-robin over the destination URLs and over local (source) addresses
// 127.0.0.x: one (source address, destination) pair has only ~28,000 ephemeral ports.
//
// Commands (loadgen.js passes them on):
//   {"cmd":"mc_open", "n":1000, "urls":[...], "local_addresses":["127.0.0.2", ...],
//    "concurrency":100, "handshake_timeout_ms":10000, "fail_limit":200, "deadline_ms":60000}
//        opens n more clients; stops starting new ones after fail_limit failures or the deadline.
//   {"cmd":"mc_arm", "run":1}      count the deliveries of broadcast `run` from now on
//   {"cmd":"mc_publish", "run":1}  the first joined client publishes "new_msg" (wall-clock stamp)
//   {"cmd":"mc_collect", "deadline_ms":30000}   wait until every client armed got it, or deadline
//   {"cmd":"mc_close", "timeout_ms":60000}      close every client (terminate after the bound)
//   {"cmd":"mc_stats"}
const WebSocket = require("ws");
const { performance } = require("perf_hooks");

const TOPIC = "room:lobby";
const NEW_MSG = '[null,null,"room:lobby","new_msg"';
const JOIN_REPLY = `["1","1","${TOPIC}","phx_reply"`;
const clients = [];       // joined clients, in open order
let opened = 0;
const counters = { attempted: 0, opened: 0, joined: 0, failed: 0, closed_by_server: 0,
                   heartbeats: 0, errors_after_join: 0, stale_new_msg: 0 };
const failures = {};      // cause -> count
const closeCodes = {};
const firstErrors = [];
let bc = null;            // armed broadcast: {run, armed, received, dup, lat: []}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const wallMs = () => performance.timeOrigin + performance.now();   // comparable across processes

function fail(cause) {
  const k = String(cause).slice(0, 80);
  failures[k] = (failures[k] || 0) + 1;
  counters.failed++;
}

function onBroadcast(c, s) {
  const i = s.indexOf('"M:');
  if (i < 0 || bc === null) { counters.stale_new_msg++; return; }
  const [run, t] = s.slice(i + 3, s.indexOf('"', i + 3)).split(":");
  if (+run !== bc.run) { counters.stale_new_msg++; return; }
  if (c.got === bc.run) { bc.dup++; return; }
  c.got = bc.run;
  bc.received++;
  bc.lat.push(Math.round((wallMs() - +t) * 10) / 10);
}

function openOne(url, localAddress, timeoutMs, joinPayload) {
  return new Promise((resolve) => {
    counters.attempted++;
    const c = { ws: null, joined: false, closing: false, lastSent: performance.now(), got: -1 };
    let done = false, isOpen = false;
    const ws = new WebSocket(`${url}?user=mc&vsn=2.0.0`, {
      perMessageDeflate: false, skipUTF8Validation: true, handshakeTimeout: timeoutMs,
      localAddress: localAddress || undefined });
    c.ws = ws;
    const finish = (ok, cause) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      if (!ok) {
        fail(cause);
        if (firstErrors.length < 20) firstErrors.push(`${localAddress || ""}->${url}: ${cause}`);
        try { ws.terminate(); } catch (e) { /* already gone */ }
      }
      resolve(ok ? c : null);
    };
    const timer = setTimeout(() => finish(false, isOpen ? "join reply timeout" : "connect timeout"),
                             timeoutMs + 2000);
    ws.on("open", () => {
      isOpen = true;
      counters.opened++;
      c.lastSent = performance.now();
      ws.send(`["1","1","${TOPIC}","phx_join",${JSON.stringify(joinPayload)}]`);
    });
    ws.on("unexpected-response", (req, res) => { req.destroy(); finish(false, `HTTP ${res.statusCode}`); });
    ws.on("error", (e) => {
      if (!done) finish(false, e.code || e.message);
      else counters.errors_after_join++;
    });
    ws.on("close", (code) => {
      if (!done) { finish(false, `closed (${code}) before the join reply`); return; }
      if (c.joined && !c.closing) {
        counters.closed_by_server++;
        closeCodes[code] = (closeCodes[code] || 0) + 1;
      }
      c.joined = false;
    });
    ws.on("message", (data) => {
      const s = data.toString("utf8");
      if (s.startsWith(NEW_MSG)) { onBroadcast(c, s); return; }
      if (!done && s.startsWith(JOIN_REPLY)) {
        if (s.includes('"status":"ok"')) { c.joined = true; counters.joined++; finish(true); }
        else finish(false, `join refused: ${s.slice(JOIN_REPLY.length, JOIN_REPLY.length + 60)}`);
      }
    });
  });
}

// The server closes a client that sent nothing for 60 s.
const hb = setInterval(() => {
  const now = performance.now();
  let sent = 0;
  for (const c of clients) {
    if (c.joined && now - c.lastSent > 25000) {
      c.lastSent = now;
      c.ws.send(`[null,"hb","phoenix","heartbeat",{}]`);
      counters.heartbeats++;
      if (++sent >= 3000) break;
    }
  }
}, 1000);
hb.unref();

async function mcOpen(o) {
  const n = o.n ?? 1000, urls = o.urls, la = o.local_addresses?.length ? o.local_addresses : [null];
  const conc = o.concurrency ?? 100, failLimit = o.fail_limit ?? Math.max(50, n);
  const deadline = performance.now() + (o.deadline_ms ?? 600000);
  if (!urls || !urls.length) throw new Error("mc_open: urls required");
  const f0 = { ...failures }, j0 = counters.joined, x0 = counters.failed;
  const t0 = performance.now();
  let started = 0, stoppedBy = null;
  async function lane() {
    while (started < n) {
      if (counters.failed - x0 >= failLimit) { stoppedBy = stoppedBy || "fail_limit"; return; }
      if (performance.now() > deadline) { stoppedBy = stoppedBy || "deadline"; return; }
      const k = opened++;
      started++;
      const c = await openOne(urls[k % urls.length], la[k % la.length], o.handshake_timeout_ms ?? 10000,
                              o.join_payload ?? {});
      if (c) clients.push(c);
    }
  }
  await Promise.all(Array.from({ length: Math.min(conc, n) }, lane));
  const el = performance.now() - t0;
  const newFailures = {};
  for (const [k, v] of Object.entries(failures)) if (v - (f0[k] || 0)) newFailures[k] = v - (f0[k] || 0);
  return { requested: n, started, joined: counters.joined - j0, failed: counters.failed - x0,
           failures: newFailures, stopped_by: stoppedBy, elapsed_ms: Math.round(el),
           total_joined: clients.filter((c) => c.joined).length };
}

function mcArm(o) {
  bc = { run: o.run ?? 1, armed: clients.filter((c) => c.joined).length, received: 0, dup: 0, lat: [] };
  return { armed: bc.armed };
}

function mcPublish(o) {
  const c = clients.find((x) => x.joined);
  if (!c) throw new Error("mc_publish: no joined client");
  const t = wallMs();
  c.lastSent = performance.now();
  c.ws.send(`["1","2","${TOPIC}","new_msg",${JSON.stringify({ body: `M:${o.run ?? 1}:${t.toFixed(3)}` })}]`);
  return { published_at_ms: t };
}

async function mcCollect(o) {
  if (!bc) throw new Error("mc_collect: not armed");
  const deadline = performance.now() + (o.deadline_ms ?? 30000);
  while (bc.received < bc.armed && performance.now() < deadline) await sleep(20);
  const res = { armed: bc.armed, received: bc.received, duplicates: bc.dup,
                joined_now: clients.filter((c) => c.joined).length, latencies_ms: bc.lat };
  bc = null;
  return res;
}

async function mcClose(o) {
  const t0 = performance.now();
  const deadline = t0 + (o.timeout_ms ?? 60000);
  let closed = 0, terminated = 0;
  const all = clients.splice(0);
  for (let i = 0; i < all.length; i += 1000) {
    const chunk = all.slice(i, i + 1000);
    const late = performance.now() > deadline;
    await Promise.all(chunk.map((c) => new Promise((resolve) => {
      c.closing = true;
      const ws = c.ws;
      if (ws.readyState === WebSocket.CLOSED) { resolve(); return; }
      if (late) { terminated++; ws.terminate(); resolve(); return; }
      const timer = setTimeout(() => { terminated++; ws.terminate(); resolve(); }, 5000);
      ws.once("close", () => { clearTimeout(timer); closed++; resolve(); });
      try { ws.close(1000); } catch (e) { clearTimeout(timer); resolve(); }
    })));
  }
  return { clients: all.length, closed, terminated, elapsed_ms: Math.round(performance.now() - t0) };
}

function mcStats() {
  const mem = process.memoryUsage();
  return { counters, failures, close_codes: closeCodes, first_errors: firstErrors,
           joined: clients.filter((c) => c.joined).length, rss_kb: Math.round(mem.rss / 1024) };
}

module.exports = { mc_open: mcOpen, mc_arm: mcArm, mc_publish: mcPublish, mc_collect: mcCollect,
                   mc_close: mcClose, mc_stats: mcStats };
