"use strict";
// The well-behaved client of bench/attack.py: real phoenix.js (over the `ws` package) on the
// attacked edge, from 127.0.0.1, reporting what a user would notice while an attack runs.
//
//   node bench/canary.js '{"url":"ws://127.0.0.1:PORT/socket", "topic":"room:lobby",
//                          "ping_ms":200, "ping_timeout_ms":5000, "fresh_ms":2000,
//                          "fresh_timeout_ms":10000}'
//
// One socket joins `topic` and pushes "ping" {seq} every ping_ms (on a fixed schedule, whether
// or not the previous reply came); a ping without an ok reply within ping_timeout_ms is lost.
// Every fresh_ms a fresh socket connects, joins `topic` and disconnects: it counts as joined
// when the join is ok within fresh_timeout_ms (phoenix.js retries the connection by itself
// meanwhile, as it would for a user).
//
// stdout, one JSON object a line, times in ms since the epoch (comparable with Python's
// time.time() * 1000):
//   {"type":"joined","t"}                                 the main channel joined (again)
//   {"type":"sent","seq","sent"}                          a ping went out
//   {"type":"fresh_start","started"}                      a fresh connect began
//   {"type":"ping","seq","sent","rtt"}                    a reply arrived
//   {"type":"ping_lost","seq","sent","why"}               "timeout" or "error"
//   {"type":"fresh","started","ms","ok","why","errors"}   one fresh connect + join
//   {"type":"sock_error"|"sock_close","t","what"}         of the main socket
// The process ends on SIGTERM or when stdin closes.
const path = require("path");
const WebSocket = require("ws");
const { Socket } = require(path.join(__dirname, "..", "node_modules", "phoenix"));

const cfg = Object.assign({ topic: "room:lobby", ping_ms: 200, ping_timeout_ms: 5000,
                            fresh_ms: 2000, fresh_timeout_ms: 10000 }, JSON.parse(process.argv[2]));
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const errText = (e) => String((e && (e.message || (e.error && e.error.message))) || e || "error").slice(0, 120);
const quiet = { logger: null };

function newSocket(user, extra) {
  // A long heartbeat: the canary's own traffic keeps the connection alive.
  return new Socket(cfg.url, Object.assign({ transport: WebSocket, params: { user },
                                             heartbeatIntervalMs: 30000 }, extra));
}

const main = newSocket("canary", { timeout: cfg.ping_timeout_ms });
main.onError((e) => out({ type: "sock_error", t: Date.now(), what: errText(e) }));
main.onClose((e) => out({ type: "sock_close", t: Date.now(), what: String(e && e.code) }));
main.connect();
const chan = main.channel(cfg.topic, {});
chan.join(cfg.ping_timeout_ms).receive("ok", () => out({ type: "joined", t: Date.now() }));
chan.onError(() => out({ type: "chan_error", t: Date.now() }));

let seq = 0;
const pinger = setInterval(() => {
  const s = ++seq;
  const sent = Date.now();
  out({ type: "sent", seq: s, sent });
  chan.push("ping", { seq: s }, cfg.ping_timeout_ms)
    .receive("ok", () => out({ type: "ping", seq: s, sent, rtt: Date.now() - sent }))
    .receive("error", () => out({ type: "ping_lost", seq: s, sent, why: "error" }))
    .receive("timeout", () => out({ type: "ping_lost", seq: s, sent, why: "timeout" }));
}, cfg.ping_ms);

function fresh() {
  const started = Date.now();
  out({ type: "fresh_start", started });
  const errors = [];
  const s = newSocket("fresh", { timeout: cfg.fresh_timeout_ms, logger: quiet.logger });
  let done = false;
  const finish = (ok, why) => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    out({ type: "fresh", started, ms: Date.now() - started, ok, why, errors: errors.slice(0, 5) });
    s.disconnect();
  };
  const timer = setTimeout(() => finish(false, "timeout"), cfg.fresh_timeout_ms);
  s.onError((e) => errors.push(errText(e)));
  s.connect();
  s.channel(cfg.topic, {}).join(cfg.fresh_timeout_ms)
    .receive("ok", () => finish(true, null))
    .receive("error", (r) => finish(false, "join error " + JSON.stringify(r).slice(0, 80)))
    .receive("timeout", () => finish(false, "join timeout"));
}
const freshTimer = setInterval(fresh, cfg.fresh_ms);

function stop() {
  clearInterval(pinger);
  clearInterval(freshTimer);
  process.exit(0);
}
process.on("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.resume();
