"use strict";
// Presence clients for bench/loadgen.js (phase "presence", docs/benchmarks.md,
// bench/phase_presence.py).
//
// Each client is a raw Phoenix V2 JSON WebSocket (npm `ws`) with a user name of its own
// (`?user=u<i>`) that joins room:lobby with {"track": true}, so the chat app tracks it in
// presence and pushes it "presence_state". It keeps its presence list exactly as phoenix.js's
// `Presence` does: syncState / syncDiff with phoenix.js's results (bench/presencesync.js), and
// "presence_diff" frames that arrive before this join's "presence_state" are queued and applied
// after it (`Presence.inPendingSyncState`). The number of keys is kept from the onJoin/onLeave
// callbacks, so "is my list complete" costs nothing per frame; the full lists are compared with
// the expected users once, at the end of each command. The server writes the same bytes of a
// presence_diff to every member, so the load generator parses each distinct diff frame once and
// applies that one parsed diff to every client's own list (it is never modified).
//
// Commands (loadgen.js passes them on):
//   {"cmd":"pr_open", "n":2000, "urls":[...], "concurrency":200}   connect n clients (no join)
//   {"cmd":"pr_join", "timeout_ms":60000, "grace_ms":1000}
//        every connected client sends its phx_join in one loop; waits until every list holds
//        every joining user (or the timeout), then grace_ms more, and reports.
//   {"cmd":"pr_leave", "keep":100, "timeout_ms":60000, "grace_ms":1000}
//        the joined clients after the first `keep` (the observers) send phx_leave in one loop;
//        waits until every observer's list holds exactly the observers (or the timeout).
//   {"cmd":"pr_close"}   close every client;   {"cmd":"pr_stats"}
const WebSocket = require("ws");
const Presence = require("./presencesync");
const { performance } = require("perf_hooks");

const TOPIC = "room:lobby";
const DIFF_FRAME = `[null,null,"${TOPIC}","presence_diff",`;
const parsedDiffs = new Map();   // frame text -> parsed frame, the last few distinct diffs
const clients = [];
const counters = { opened: 0, open_failed: 0, joined: 0, join_failed: 0, leave_replies: 0,
                   closed_by_server: 0, channel_errors: 0, stale_frames: 0, frames_after_leave: 0,
                   bad_frames: 0, other_frames: 0, heartbeats: 0, distinct_diffs: 0, distinct_diff_keys: 0,
                   distinct_diff_leave_keys: 0 };
const closeCodes = {};
const firstErrors = [];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function noteError(s) { if (firstErrors.length < 20) firstErrors.push(s); }

class PresClient {
  constructor(id, url) {
    this.id = id;
    this.url = url;
    this.user = `u${id}`;
    this.ws = null;
    this.isOpen = false;
    this.closing = false;
    this.ref = 0;
    this.joinRef = null;
    this.leaveRef = null;
    this.joined = false;
    this.left = false;           // phoenix.js removes the channel at leave(): later frames are ignored
    this.lastSent = performance.now();
    this.state = Object.create(null);
    this.keys = 0;
    this.stateJoinRef = null;    // Presence.joinRef: the join whose presence_state was applied
    this.pendingDiffs = [];
    this.target = null;          // the key count the running command waits for
    this.doneAt = null;
    this.joinSentAt = null;
    this.joinReplyAt = null;
    this.stateAt = null;
    this.resetFrames();
    this.onJoin = (key, current) => { if (!current) this.keys++; };
    this.onLeave = (key, current) => { if (current.metas.length === 0) this.keys--; };
  }

  resetFrames() {
    this.f = { state_frames: 0, diff_frames: 0, state_bytes: 0, diff_bytes: 0, queued_diffs: 0 };
  }

  connect() {
    return new Promise((resolve) => {
      const ws = new WebSocket(`${this.url}?user=${this.user}&vsn=2.0.0`,
                               { perMessageDeflate: false, skipUTF8Validation: true, handshakeTimeout: 30000 });
      this.ws = ws;
      let settled = false;
      const settle = (ok, why) => {
        if (settled) return;
        settled = true;
        if (ok) counters.opened++;
        else { counters.open_failed++; noteError(`${this.user}: ${why}`); }
        resolve(ok);
      };
      ws.on("open", () => { this.isOpen = true; settle(true); });
      ws.on("unexpected-response", (req, res) => { req.destroy(); settle(false, `HTTP ${res.statusCode}`); });
      ws.on("error", (e) => settle(false, e.code || e.message));
      ws.on("close", (code) => {
        if (this.isOpen && !this.closing) {
          counters.closed_by_server++;
          closeCodes[code] = (closeCodes[code] || 0) + 1;
          noteError(`${this.user} closed by the server, code ${code}`);
        }
        this.isOpen = false;
        this.joined = false;
        settle(false, `closed (${code})`);
      });
      ws.on("message", (data) => this.onMessage(data));
    });
  }

  send(text) { this.lastSent = performance.now(); this.ws.send(text); }

  join() {
    this.joinRef = String(++this.ref);
    this.joinSentAt = performance.now();
    this.send(`["${this.joinRef}","${this.joinRef}","${TOPIC}","phx_join",{"track":true}]`);
  }

  leave() {
    this.leaveRef = String(++this.ref);
    this.left = true;
    this.joined = false;
    this.send(`["${this.joinRef}","${this.leaveRef}","${TOPIC}","phx_leave",{}]`);
  }

  onMessage(data) {
    const s = data.toString("utf8");
    const isDiff = s.startsWith(DIFF_FRAME);
    let msg = isDiff ? parsedDiffs.get(s) : undefined;
    if (msg === undefined) {
      try { msg = JSON.parse(s); } catch (e) { counters.bad_frames++; return; }
      if (isDiff) {
        counters.distinct_diffs++;
        const leaves = Object.keys(msg[4]?.leaves ?? {}).length;
        counters.distinct_diff_keys += Object.keys(msg[4]?.joins ?? {}).length + leaves;
        counters.distinct_diff_leave_keys += leaves;
        parsedDiffs.set(s, msg);
        if (parsedDiffs.size > 64) parsedDiffs.delete(parsedDiffs.keys().next().value);
      }
    }
    if (!Array.isArray(msg) || msg.length !== 5) { counters.bad_frames++; return; }
    const [joinRef, ref, topic, event, payload] = msg;
    if (topic !== TOPIC) return;   // heartbeat replies
    if (event === "phx_reply" && ref !== null && ref === this.leaveRef) { counters.leave_replies++; return; }
    if (this.left) { counters.frames_after_leave++; return; }
    // Channel.isMember: a frame of another join of this topic is dropped
    if (joinRef !== null && joinRef !== this.joinRef) { counters.stale_frames++; return; }
    if (event === "presence_diff") {
      this.f.diff_frames++;
      this.f.diff_bytes += data.length;
      if (this.stateJoinRef === null || this.stateJoinRef !== this.joinRef) {
        this.pendingDiffs.push(payload);
        this.f.queued_diffs++;
        return;
      }
      this.state = Presence.syncDiff(this.state, payload, this.onJoin, this.onLeave);
      this.onSync();
    } else if (event === "presence_state") {
      this.f.state_frames++;
      this.f.state_bytes += data.length;
      this.stateAt = performance.now();
      this.stateJoinRef = this.joinRef;
      this.state = Presence.syncState(this.state, payload, this.onJoin, this.onLeave);
      for (const diff of this.pendingDiffs) this.state = Presence.syncDiff(this.state, diff, this.onJoin, this.onLeave);
      this.pendingDiffs = [];
      this.onSync();
    } else if (event === "phx_reply" && ref === this.joinRef) {
      this.joinReplyAt = performance.now();
      if (payload && payload.status === "ok") { this.joined = true; counters.joined++; }
      else { counters.join_failed++; noteError(`${this.user} join ${JSON.stringify(payload).slice(0, 120)}`); }
    } else if (event === "phx_error" || event === "phx_close") {
      counters.channel_errors++;
      this.joined = false;
      noteError(`${this.user} ${event} ${JSON.stringify(payload).slice(0, 80)}`);
    } else {
      counters.other_frames++;
    }
  }

  onSync() {
    if (this.target !== null && this.doneAt === null && this.keys === this.target) this.doneAt = performance.now();
  }

  // Compare the list with the expected users: missing and extra keys, keys with more than one meta.
  check(expected) {
    const missing = [];
    for (const u of expected) if (!(u in this.state)) missing.push(u);
    let extra = 0, multiMeta = 0;
    for (const k of Object.keys(this.state)) {
      if (!expected.has(k)) extra++;
      if (this.state[k].metas.length !== 1) multiMeta++;
    }
    return { missing, extra, multiMeta };
  }

  close() {
    return new Promise((resolve) => {
      this.closing = true;
      if (!this.ws || this.ws.readyState === WebSocket.CLOSED) { resolve(false); return; }
      const timer = setTimeout(() => { this.ws.terminate(); resolve(true); }, 5000);
      this.ws.once("close", () => { clearTimeout(timer); resolve(false); });
      try { this.ws.close(1000); } catch (e) { clearTimeout(timer); resolve(false); }
    });
  }
}

// The server closes a client that sent nothing for 60 s.
const hb = setInterval(() => {
  const now = performance.now();
  for (const c of clients) {
    if (c.isOpen && now - c.lastSent > 25000) {
      c.send(`[null,"hb${++c.ref}","phoenix","heartbeat",{}]`);
      counters.heartbeats++;
    }
  }
}, 1000);
hb.unref();

// ---- figures ----------------------------------------------------------------------------
function spread(values) {
  const a = Float64Array.from(values).sort();
  if (a.length === 0) return { n: 0, min: null, p50: null, max: null, mean: null };
  let sum = 0;
  for (const x of a) sum += x;
  const r = (x) => Math.round(x * 10) / 10;
  return { n: a.length, min: r(a[0]), p50: r(a[Math.floor((a.length - 1) / 2)]),
           p90: r(a[Math.ceil(0.9 * a.length) - 1]), max: r(a[a.length - 1]), mean: r(sum / a.length) };
}

// Per client presence frames and bytes; the distinct presence_diff broadcasts (and the keys in
// their joins + leaves) since the counters `c0` were taken.
function frames(cs, c0) {
  const of = (fn) => spread(cs.map(fn));
  return {
    distinct_diffs: counters.distinct_diffs - c0.distinct_diffs,
    distinct_diff_keys: counters.distinct_diff_keys - c0.distinct_diff_keys,
    distinct_diff_leave_keys: counters.distinct_diff_leave_keys - c0.distinct_diff_leave_keys,
    presence_frames: of((c) => c.f.state_frames + c.f.diff_frames),
    state_frames: of((c) => c.f.state_frames), diff_frames: of((c) => c.f.diff_frames),
    presence_bytes: of((c) => c.f.state_bytes + c.f.diff_bytes),
    state_bytes: of((c) => c.f.state_bytes), diff_bytes: of((c) => c.f.diff_bytes),
    diffs_queued_before_state: cs.reduce((s, c) => s + c.f.queued_diffs, 0),
  };
}

// Every list against the expected users; for an incomplete one, when its missing users joined
// relative to when this client got its presence_state (a race points at the server).
function verify(cs, expected, byUser, t0) {
  const missingBy = new Map();
  const missingAfterState = [];
  let incomplete = 0, missingEntries = 0, withExtra = 0, extraEntries = 0, multiMeta = 0, listsWrong = 0;
  const incompleteByEdge = {};
  for (const c of cs) {
    const v = c.check(expected);
    if (v.missing.length || v.extra || v.multiMeta) listsWrong++;
    extraEntries += v.extra;
    if (v.extra) withExtra++;
    multiMeta += v.multiMeta;
    if (!v.missing.length) continue;
    incomplete++;
    missingEntries += v.missing.length;
    incompleteByEdge[c.url] = (incompleteByEdge[c.url] || 0) + 1;
    for (const u of v.missing) {
      missingBy.set(u, (missingBy.get(u) || 0) + 1);
      const m = byUser.get(u);
      if (m && m.joinReplyAt !== null && c.stateAt !== null) missingAfterState.push(m.joinReplyAt - c.stateAt);
    }
  }
  const top = [...missingBy.entries()].sort((x, y) => y[1] - x[1]).slice(0, 10)
    .map(([u, n]) => ({ user: u, missing_at: n, edge: byUser.get(u)?.url,
                        join_sent_ms: byUser.get(u)?.joinSentAt != null ? Math.round(byUser.get(u).joinSentAt - t0) : null }));
  return { lists_wrong: listsWrong, incomplete, missing_entries: missingEntries, users_missing_somewhere: missingBy.size,
           lists_with_extra: withExtra, extra_entries: extraEntries, keys_with_several_metas: multiMeta, incomplete_by_edge: incompleteByEdge,
           most_missed: top,
           missing_user_join_reply_minus_own_state_ms: missingAfterState.length ? spread(missingAfterState) : null };
}

async function waitDone(watched, deadline) {
  while (performance.now() < deadline && !watched.every((c) => c.doneAt !== null || !c.isOpen)) await sleep(10);
}

function completion(watched, t0) {
  const done = watched.filter((c) => c.doneAt !== null);
  const last = done.reduce((m, c) => Math.max(m, c.doneAt), -Infinity);
  return { complete: done.length, incomplete: watched.length - done.length,
           all_complete_ms: done.length === watched.length && done.length ? Math.round(last - t0) : null,
           last_complete_ms: done.length ? Math.round(last - t0) : null,
           complete_ms: spread(done.map((c) => c.doneAt - t0)) };
}

// ---- commands ---------------------------------------------------------------------------
async function prOpen(o) {
  const n = o.n ?? 2000, urls = o.urls, conc = o.concurrency ?? 200;
  if (!urls || !urls.length) throw new Error("pr_open: urls required");
  const base = clients.length, o0 = counters.opened, f0 = counters.open_failed;
  const t0 = performance.now();
  let next = 0;
  async function lane() {
    while (next < n) {
      const i = base + next++;
      const c = new PresClient(i, urls[i % urls.length]);
      clients.push(c);
      await c.connect();
    }
  }
  await Promise.all(Array.from({ length: Math.min(conc, n) }, lane));
  return { requested: n, opened: counters.opened - o0, open_failed: counters.open_failed - f0,
           elapsed_ms: Math.round(performance.now() - t0) };
}

async function prJoin(o) {
  const timeout = o.timeout_ms ?? 60000, grace = o.grace_ms ?? 1000;
  const joiners = clients.filter((c) => c.isOpen && c.joinRef === null);
  const n = joiners.length;
  if (n === 0) throw new Error("pr_join: no connected client that has not joined");
  const expected = new Set(joiners.map((c) => c.user));
  const byUser = new Map(joiners.map((c) => [c.user, c]));
  const j0 = counters.joined, jf0 = counters.join_failed, c0 = { ...counters };
  for (const c of joiners) { c.resetFrames(); c.target = n; c.doneAt = null; }
  const t0 = performance.now();
  for (const c of joiners) c.join();
  const sentMs = performance.now() - t0;
  await waitDone(joiners, t0 + timeout);
  const res = { clients: n, joins_sent_ms: Math.round(sentMs), ...completion(joiners, t0),
                timeout_ms: timeout, timed_out: joiners.some((c) => c.doneAt === null) };
  await sleep(grace);
  const replied = joiners.filter((c) => c.joinReplyAt !== null);
  const got = joiners.filter((c) => c.stateAt !== null);
  Object.assign(res, {
    joined_ok: counters.joined - j0, join_failed: counters.join_failed - jf0,
    join_reply_ms: spread(replied.map((c) => c.joinReplyAt - c.joinSentAt)),
    presence_state_received: got.length, presence_state_ms: spread(got.map((c) => c.stateAt - t0)),
    ...frames(joiners, c0), grace_ms: grace,
    check: verify(joiners, expected, byUser, t0),
    still_open: joiners.filter((c) => c.isOpen).length,
  });
  for (const c of joiners) c.target = null;
  return res;
}

async function prLeave(o) {
  const timeout = o.timeout_ms ?? 60000, grace = o.grace_ms ?? 1000, keep = o.keep ?? 100;
  const joined = clients.filter((c) => c.joined && c.isOpen);
  const observers = joined.slice(0, keep), leavers = joined.slice(keep);
  if (!observers.length) throw new Error("pr_leave: no joined client");
  const expected = new Set(observers.map((c) => c.user));
  const byUser = new Map(joined.map((c) => [c.user, c]));
  const lr0 = counters.leave_replies, c0 = { ...counters };
  for (const c of observers) { c.resetFrames(); c.target = observers.length; c.doneAt = null; }
  const t0 = performance.now();
  for (const c of leavers) c.leave();
  const sentMs = performance.now() - t0;
  await waitDone(observers, t0 + timeout);
  const res = { observers: observers.length, leavers: leavers.length, leaves_sent_ms: Math.round(sentMs),
                ...completion(observers, t0), timeout_ms: timeout,
                timed_out: observers.some((c) => c.doneAt === null) };
  await sleep(grace);
  Object.assign(res, { leave_replies: counters.leave_replies - lr0, ...frames(observers, c0), grace_ms: grace,
                       check: verify(observers, expected, byUser, t0),
                       still_open: observers.filter((c) => c.isOpen).length });
  for (const c of observers) c.target = null;
  return res;
}

async function prClose() {
  const t0 = performance.now();
  const all = clients.splice(0);
  let terminated = 0;
  for (let i = 0; i < all.length; i += 1000) {
    const r = await Promise.all(all.slice(i, i + 1000).map((c) => c.close()));
    terminated += r.filter(Boolean).length;
  }
  return { clients: all.length, terminated, elapsed_ms: Math.round(performance.now() - t0) };
}

function prStats() {
  return { counters, close_codes: closeCodes, first_errors: firstErrors, clients: clients.length,
           open: clients.filter((c) => c.isOpen).length, joined: clients.filter((c) => c.joined).length,
           rss_kb: Math.round(process.memoryUsage().rss / 1024) };
}

module.exports = { pr_open: prOpen, pr_join: prJoin, pr_leave: prLeave, pr_close: prClose, pr_stats: prStats };
