"use strict";
// LongPoll clients for bench/loadgen.js (phase "longpoll", docs/benchmarks.md).
//
// Raw Phoenix V2 frames over the LongPoll protocol (docs/protocol.md §6), no phoenix.js: Node's
// `http` module with one keep-alive agent. A client creates its session with a GET without
// token (-> {"status":410,"token":T}), then always keeps exactly one GET ?token=T poll
// outstanding (200 with "messages", each a JSON string holding one V2 frame, or 204 after the
// poll window) and POSTs its frames as application/x-ndjson lines (-> {"status":200}); the
// replies come back through the poll. The broadcasts are published by one WebSocket client
// (npm `ws`), so only the subscribers are LongPoll.
//
// Commands (loadgen.js passes them on):
//   {"cmd":"lp_open", "n":200, "urls":["http://127.0.0.1:P/socket/longpoll", ...],
//    "user":"bench", "join_payload":{}, "concurrency":50}   n more sessions, each joins room:lobby
//   {"cmd":"lp_pings", "clients":200, "duration_ms":10000}  sequential "ping" round trips
//   {"cmd":"lp_publisher", "url":"ws://..."}                open + join the WebSocket publisher
//   {"cmd":"lp_fanout", "msgs":100, "mode":"paced"|"blast", "gap_ms":20, "quiet_ms":5000}
//   {"cmd":"lp_close"}   leave, abandon the sessions, close the publisher;   {"cmd":"lp_stats"}
const http = require("http");
const WebSocket = require("ws");
const { performance } = require("perf_hooks");

const TOPIC = "room:lobby";
const REQUEST_TIMEOUT_MS = 20000;   // phoenix.js longpollerTimeout
const PUSH_TIMEOUT_MS = 10000;      // phoenix.js push timeout
const NEW_MSG = '[null,null,"room:lobby","new_msg"';

const newAgent = () => new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 4096 });
let agent = newAgent();
const clients = [];
let publisher = null;
let fan = null;       // the running fan-out: {run, msgs, counts, lat, nlat, received, lastRecv, onDelivery}
let fanRun = 0;
const counters = {
  sessions: 0, session_failed: 0, joined: 0, join_failed: 0, polls: 0, polls_200: 0, polls_204: 0,
  messages: 0, session_gone: 0, poll_errors: 0, posts: 0, post_errors: 0, bad_frames: 0,
  unknown_replies: 0, error_replies: 0, stale_new_msg: 0, other_frames: 0, push_timeouts: 0,
  publisher_frames: 0,
};
const firstErrors = [];
const noteError = (s) => { if (firstErrors.length < 20) firstErrors.push(s); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function pct(sorted, p) {
  if (sorted.length === 0) return null;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1))];
}
function summarize(values) {
  const a = Float64Array.from(values).sort();
  const r3 = (x) => x === null ? null : Math.round(x * 1000) / 1000;
  let sum = 0; for (const x of a) sum += x;
  return { n: a.length, p50_ms: r3(pct(a, 50)), p90_ms: r3(pct(a, 90)), p99_ms: r3(pct(a, 99)),
           max_ms: r3(a.length ? a[a.length - 1] : null), mean_ms: r3(a.length ? sum / a.length : null) };
}

// One HTTP request; resolves with the parsed JSON body. `onReq` gets the request (to abort a poll).
function httpJson(method, url, body, onReq) {
  return new Promise((resolve, reject) => {
    const headers = { accept: "application/json" };
    if (body !== null) {
      headers["content-type"] = "application/x-ndjson";
      headers["content-length"] = Buffer.byteLength(body);
    }
    const req = http.request(url, { method, agent, headers }, (res) => {
      const chunks = [];
      res.on("data", (c) => chunks.push(c));
      res.on("error", reject);
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        if (res.statusCode !== 200) { reject(new Error(`HTTP ${res.statusCode} ${text.slice(0, 80)}`)); return; }
        try { resolve(JSON.parse(text)); } catch (e) { reject(new Error(`unparsable body ${text.slice(0, 80)}`)); }
      });
    });
    req.setTimeout(REQUEST_TIMEOUT_MS, () => req.destroy(new Error("request timeout")));
    req.on("error", reject);
    if (onReq) onReq(req);
    req.end(body === null ? undefined : body);
  });
}

class LPClient {
  constructor(base, user) {
    this.base = `${base}${base.includes("?") ? "&" : "?"}user=${encodeURIComponent(user)}&vsn=2.0.0`;
    this.token = null;
    this.ref = 0;
    this.joinRef = null;
    this.pending = new Map();   // ref -> callback(status)
    this.joined = false;
    this.stopped = false;
    this.dead = false;          // the session failed (poll error, 410): no more requests
    this.pollReq = null;
  }
  url() { return this.token === null ? this.base : `${this.base}&token=${encodeURIComponent(this.token)}`; }

  async create() {
    const r = await httpJson("GET", this.url(), null);
    if (r.status !== 410 || typeof r.token !== "string") throw new Error(`new session answered ${JSON.stringify(r).slice(0, 80)}`);
    this.token = r.token;
    counters.sessions++;
    this.pollLoop();
  }

  fail(why) {
    this.dead = true;
    this.joined = false;
    for (const cb of this.pending.values()) cb(why);
    this.pending.clear();
  }

  async pollLoop() {
    while (!this.stopped) {
      let r;
      try {
        r = await httpJson("GET", this.url(), null, (req) => { this.pollReq = req; });
      } catch (e) {
        if (!this.stopped) { counters.poll_errors++; noteError(`poll: ${e.message}`); this.fail("poll_error"); }
        return;
      } finally { this.pollReq = null; }
      counters.polls++;
      if (r.status === 200) {
        counters.polls_200++;
        for (const m of r.messages) this.onFrame(m);
      } else if (r.status === 204) {
        counters.polls_204++;
      } else {
        if (r.status === 410) counters.session_gone++; else counters.poll_errors++;
        noteError(`poll answered ${JSON.stringify(r).slice(0, 100)}`);
        this.fail(r.status === 410 ? "session_gone" : "poll_error");
        return;
      }
    }
  }

  onFrame(s) {
    counters.messages++;
    if (typeof s !== "string") { counters.bad_frames++; return; }
    if (s.startsWith(NEW_MSG)) {
      const now = performance.now();
      const i = s.indexOf('"B:');
      if (i < 0 || fan === null) { counters.stale_new_msg++; return; }
      const parts = s.slice(i + 3, s.indexOf('"', i + 3)).split(":");   // run, seq, t
      const r = +parts[0], seq = +parts[1], t = +parts[2];
      if (r !== fan.run || !(seq >= 0 && seq < fan.msgs)) { counters.stale_new_msg++; return; }
      fan.counts[seq]++;
      fan.lat.push(now - t);
      fan.received++;
      fan.lastRecv = now;
      if (fan.onDelivery) fan.onDelivery(seq);
      return;
    }
    let msg;
    try { msg = JSON.parse(s); } catch (e) { counters.bad_frames++; noteError(`bad frame ${s.slice(0, 80)}`); return; }
    if (!Array.isArray(msg) || msg.length < 5) { counters.bad_frames++; return; }
    const [, ref, , event, payload] = msg;
    if (event !== "phx_reply") { counters.other_frames++; return; }
    const cb = ref !== null ? this.pending.get(ref) : undefined;
    if (cb === undefined) { counters.unknown_replies++; return; }
    this.pending.delete(ref);
    const status = payload && payload.status;
    if (status !== "ok") { counters.error_replies++; noteError(`error reply ${s.slice(0, 160)}`); }
    cb(status);
  }

  // POST one V2 frame, call cb(status) when its reply arrives through the poll (or on failure).
  push(event, payload, cb, timeoutMs = PUSH_TIMEOUT_MS) {
    const ref = String(++this.ref);
    if (event === "phx_join") this.joinRef = ref;
    const timer = setTimeout(() => {
      if (this.pending.delete(ref)) { counters.push_timeouts++; cb("timeout"); }
    }, timeoutMs);
    this.pending.set(ref, (status) => { clearTimeout(timer); cb(status); });
    counters.posts++;
    const frame = `["${this.joinRef}","${ref}","${TOPIC}","${event}",${JSON.stringify(payload)}]`;
    httpJson("POST", this.url(), frame).then((r) => {
      if (r.status === 200) return;
      counters.post_errors++;
      noteError(`POST answered ${JSON.stringify(r).slice(0, 80)}`);
      const c = this.pending.get(ref);
      if (c) { this.pending.delete(ref); c("post_failed"); }
    }, (e) => {
      counters.post_errors++;
      noteError(`POST: ${e.message}`);
      const c = this.pending.get(ref);
      if (c) { this.pending.delete(ref); c("post_failed"); }
    });
  }

  request(event, payload) { return new Promise((resolve) => this.push(event, payload, resolve)); }
}

const live = () => clients.filter((c) => c.joined && !c.dead);

async function lpOpen(o) {
  const n = o.n ?? 200, urls = o.urls, conc = o.concurrency ?? 50;
  if (!urls || !urls.length) throw new Error("lp_open: urls required");
  const before = { ...counters };
  const createLat = [], joinLat = [];
  const t0 = performance.now();
  let started = 0;
  const base = clients.length;
  async function lane() {
    while (started < n) {
      const i = started++;
      const c = new LPClient(urls[(base + i) % urls.length], o.user ?? "bench");
      clients.push(c);
      const a = performance.now();
      try { await c.create(); } catch (e) {
        counters.session_failed++; noteError(`session: ${e.message}`); c.dead = true; continue;
      }
      const b = performance.now();
      createLat.push(b - a);
      const status = await c.request("phx_join", o.join_payload ?? {});
      if (status === "ok") { c.joined = true; counters.joined++; joinLat.push(performance.now() - b); }
      else { counters.join_failed++; noteError(`join: ${status}`); }
    }
  }
  await Promise.all(Array.from({ length: Math.min(conc, n) }, lane));
  const el = performance.now() - t0;
  return { requested: n, elapsed_ms: Math.round(el), sessions: counters.sessions - before.sessions,
           session_failed: counters.session_failed - before.session_failed,
           joined: counters.joined - before.joined, join_failed: counters.join_failed - before.join_failed,
           joins_per_s: Math.round((counters.joined - before.joined) / (el / 1000)),
           session_latency: summarize(createLat), join_latency: summarize(joinLat), total_joined: live().length };
}

async function lpPings(o) {
  const all = live();
  const nC = Math.min(o.clients ?? all.length, all.length);
  const stopAt = performance.now() + (o.duration_ms ?? 10000);
  const lat = [];
  const fails = {};
  let stopped = 0;
  const t0 = performance.now();
  await Promise.all(all.slice(0, nC).map(async (c) => {
    while (performance.now() < stopAt && !c.dead) {
      const ts = performance.now();
      const status = await c.request("ping", { q: "ping" });
      if (status === "ok") { lat.push(performance.now() - ts); continue; }
      fails[status] = (fails[status] || 0) + 1;   // one failure stops this client
      stopped++;
      return;
    }
  }));
  const el = performance.now() - t0;
  return { clients: nC, elapsed_ms: Math.round(el), round_trips: lat.length,
           round_trips_per_s: Math.round(lat.length / (el / 1000)), latency: summarize(lat),
           failures: fails, clients_stopped_by_failure: stopped };
}

async function lpPublisher(o) {
  if (publisher && publisher.ws.readyState === WebSocket.OPEN) return { already: true };
  const url = `${o.url}?user=${encodeURIComponent(o.user ?? "publisher")}&vsn=2.0.0`;
  const ws = new WebSocket(url, { perMessageDeflate: false, skipUTF8Validation: true });
  ws.on("error", (e) => noteError(`publisher: ${e.message}`));
  await new Promise((resolve, reject) => { ws.once("open", resolve); ws.once("close", () => reject(new Error("publisher: closed"))); });
  const joined = new Promise((resolve) => {
    ws.on("message", (data) => {
      const s = data.toString("utf8");
      if (s.startsWith('["1","1"')) resolve(s.includes('"status":"ok"'));
      else counters.publisher_frames++;   // its own copies of the broadcasts
    });
  });
  ws.send(`["1","1","${TOPIC}","phx_join",{}]`);
  if (!(await joined)) throw new Error("publisher: join refused");
  publisher = { ws, ref: 1, hb: setInterval(() => ws.send(`[null,"hb","phoenix","heartbeat",{}]`), 25000) };
  publisher.hb.unref();
  ws.on("close", () => { if (publisher && publisher.ws === ws) { clearInterval(publisher.hb); publisher = null; } });
  return { joined: true };
}

async function lpFanout(o) {
  const msgs = o.msgs ?? 100, mode = o.mode ?? "paced", gap = o.gap_ms ?? 20, quiet = o.quiet_ms ?? 5000;
  const hard = performance.now() + (o.timeout_ms ?? 300000);
  if (!publisher) throw new Error("lp_fanout: no publisher (lp_publisher first)");
  const per = live().length;
  const run = (++fanRun) % 10;
  fan = { run, msgs, counts: new Int32Array(msgs), lat: [], received: 0, lastRecv: 0, onDelivery: null };
  const publish = (seq) => {
    const ref = String(++publisher.ref);
    const body = `B:${run}:${seq}:${performance.now().toFixed(3)}`;
    publisher.ws.send(`["1","${ref}","${TOPIC}","new_msg",${JSON.stringify({ body })}]`);
  };
  const t0 = performance.now();
  const perMsg = [];
  if (mode === "blast") {
    for (let s = 0; s < msgs; s++) publish(s);
    while (fan.received < msgs * per && performance.now() < hard
           && performance.now() - Math.max(fan.lastRecv, t0) <= quiet) await sleep(5);
  } else {   // paced: one broadcast in flight; the next one gap_ms after every copy arrived (or quiet)
    for (let s = 0; s < msgs && performance.now() < hard; s++) {
      const ts = performance.now();
      await new Promise((resolve) => {
        let iv = null;
        const finish = () => { fan.onDelivery = null; clearInterval(iv); resolve(); };
        fan.onDelivery = (seq) => { if (seq === s && fan.counts[s] >= per) finish(); };
        iv = setInterval(() => {
          if (fan.counts[s] >= per || performance.now() - Math.max(fan.lastRecv, ts) > quiet
              || performance.now() > hard) finish();
        }, 10);
        publish(s);
      });
      perMsg.push(performance.now() - ts);
      if (gap > 0) await sleep(gap);
    }
    const end = performance.now() + 200;   // late stragglers
    while (performance.now() < end && fan.received < msgs * per) await sleep(10);
  }
  const span = (fan.lastRecv || performance.now()) - t0;
  let dup = 0, incomplete = 0;
  for (let s = 0; s < msgs; s++) {
    if (fan.counts[s] > per) dup += fan.counts[s] - per;
    if (fan.counts[s] < per) incomplete++;
  }
  const res = { mode, subscribers: per, msgs, expected: msgs * per, received: fan.received,
                lost: Math.max(0, msgs * per - fan.received), duplicates: dup, msgs_incomplete: incomplete,
                span_ms: Math.round(span * 1000) / 1000,
                deliveries_per_s: span > 0 ? Math.round(fan.received / (span / 1000)) : null,
                latency: summarize(fan.lat), still_joined: live().length };
  if (mode !== "blast") {
    const a = perMsg.slice().sort((x, y) => x - y);
    const r3 = (x) => x === null ? null : Math.round(x * 1000) / 1000;
    res.per_broadcast_complete_ms = { p50: r3(pct(a, 50)), max: r3(a.length ? a[a.length - 1] : null) };
  }
  fan = null;
  return res;
}

async function lpClose(o) {
  const t0 = performance.now();
  const joined = live();
  // Leave the channel (so the worker terminates it now, not when the session expires), then
  // abandon the session as phoenix.js does on disconnect: the server ends it after its inactivity.
  let left = 0;
  for (let i = 0; i < joined.length; i += 100) {
    const st = await Promise.all(joined.slice(i, i + 100).map((c) => c.request("phx_leave", {})));
    left += st.filter((s) => s === "ok").length;
  }
  for (const c of clients) { c.stopped = true; if (c.pollReq) c.pollReq.destroy(); }
  const n = clients.length;
  clients.length = 0;
  agent.destroy();
  agent = newAgent();
  if (publisher) { clearInterval(publisher.hb); publisher.ws.close(1000); publisher = null; }
  return { abandoned: n, left_ok: left, elapsed_ms: Math.round(performance.now() - t0) };
}

function lpStats() {
  return { counters, first_errors: firstErrors, clients: clients.length, joined: live().length };
}

module.exports = { lp_open: lpOpen, lp_pings: lpPings, lp_publisher: lpPublisher, lp_fanout: lpFanout,
                   lp_close: lpClose, lp_stats: lpStats };
