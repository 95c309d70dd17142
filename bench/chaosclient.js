#!/usr/bin/env node
// The clients of the chaos benchmark (bench/chaos.py): real phoenix.js sockets (npm phoenix over
// the `ws` package), many in one Node process, each joined to one room topic, pushing "ping"
// every few hundred ms and counting the numbered "bcast" broadcasts of its topic. Everything a
// client lives through is recorded with wall-clock times (Date.now(), the clock bench/chaos.py
// stamps its faults with) and handed back by the "report" command; the judging happens in
// bench/chaosreport.py.
//
// argv[2]: JSON config {urls: ["ws://127.0.0.1:P/socket", ...], first, clients, topics, ping_ms,
//          push_timeout_ms, reconnect: "failover"|"same", join_deadline_ms, max_runtime_s}
// stdin:   one JSON command per line: {"cmd": "start"|"stop"|"status"|"report"|"exit"}
// stdout:  one JSON object per line: {"type": "ready", ...} once every client joined (or the
//          join deadline passed), then one answer per command {"answer": cmd, ...}.
//
// Reconnects are phoenix.js's own (reconnectAfterMs and rejoinAfterMs left at their defaults).
// Only the address of each new connection attempt is chosen here, like a load balancer would:
// "same" dials the client's home edge every time; "failover" dials the next edge in the list on
// every attempt after the first (round robin), so a client whose edge went away tries another.
"use strict";

const path = require("path");
const readline = require("readline");
const WebSocket = require("ws");
const { Socket } = require(path.join(__dirname, "..", "node_modules", "phoenix"));

const cfg = JSON.parse(process.argv[2]);
const origins = cfg.urls.map((u) => new URL(u).origin.replace(/^http/, "ws"));
const PENDING = 0, OK = 1, ERROR = 2, TIMEOUT = 3, THREW = 4;

function out(obj) { process.stdout.write(JSON.stringify(obj) + "\n"); }
function note(map, key) { const k = String(key).slice(0, 100); map[k] = (map[k] || 0) + 1; }

class ChaosClient {
  constructor(id) {
    this.id = id;
    this.home = id % cfg.urls.length;
    this.topic = `room:chaos-${id % cfg.topics}`;
    this.current = this.home;       // edge of the latest connection attempt
    this.attempts = [];             // [t, edge] per connection attempt
    this.opens = [];                // [t, edge]
    this.closes = [];               // [t, edge, close code]
    this.episodes = [];             // [start, end or null, cause, edge at start, join errors, join timeouts]
    this.episode = null;
    this.joined = false;
    this.firstJoin = null;
    this.joinErrors = {};           // reason -> count (join error replies)
    this.joinTimeouts = 0;
    this.phxCloses = 0;
    this.pingT = [];                // push time of every ping
    this.pingO = [];                // its outcome: PENDING / OK / ERROR / TIMEOUT / THREW
    this.pingDone = [];             // when the outcome came
    this.pending = 0;
    this.errorReasons = {};         // ping error reply reason -> count
    this.wrongReplies = 0;          // an ok reply whose payload is not the ping's
    this.doubleOutcomes = 0;
    this.seen = new Set();
    this.recv = [];                 // broadcast numbers received, in order
    this.dups = [];                 // [t, n] per broadcast number received again
    this.misrouted = 0;             // a broadcast numbered for another topic
    this.timer = null;

    const client = this;
    class Transport extends WebSocket {
      constructor(url, protocols) {
        const edge = client.pickEdge();
        super(url.replace(origins[client.home], origins[edge]), protocols, { perMessageDeflate: false });
        client.current = edge;
        client.attempts.push([Date.now(), edge]);
      }
    }
    this.socket = new Socket(cfg.urls[this.home], {
      transport: Transport, params: { client: String(id) }, timeout: cfg.push_timeout_ms,
    });
    this.socket.onOpen(() => this.opens.push([Date.now(), this.current]));
    this.socket.onClose((ev) => this.closes.push([Date.now(), this.current, ev && ev.code]));
  }

  pickEdge() {
    if (cfg.reconnect === "same" || this.attempts.length === 0) return this.home;
    return (this.current + 1) % cfg.urls.length;
  }

  start() {
    this.socket.connect();
    this.join();
  }

  join() {
    const chan = this.socket.channel(this.topic, {});
    this.chan = chan;
    chan.on("bcast", (p) => this.onBroadcast(p));
    chan.onError((reason) => this.chan === chan && this.outOfChannel(reason && reason.source === "transport" ? reason.reason : "phx_error"));
    chan.onClose(() => {
      if (this.chan !== chan || this.exiting) return;
      // The server closed the channel (phx_close): phoenix.js never rejoins a closed channel,
      // so do what an application would, a fresh join.
      this.phxCloses++;
      this.outOfChannel("phx_close");
      setTimeout(() => this.join(), 0);
    });
    const push = chan.join(cfg.push_timeout_ms);
    // Receive hooks stay on the join push: they fire for every automatic rejoin too.
    push.receive("ok", () => { if (this.chan === chan) this.inChannel(); });
    push.receive("error", (r) => {
      note(this.joinErrors, r && r.reason);
      if (this.episode) this.episode[4]++;
    });
    push.receive("timeout", () => {
      this.joinTimeouts++;
      if (this.episode) this.episode[5]++;
    });
  }

  inChannel() {
    const t = Date.now();
    if (this.firstJoin === null) this.firstJoin = t;
    if (this.episode) { this.episode[1] = t; this.episode = null; }
    this.joined = true;
  }

  outOfChannel(cause) {
    if (!this.joined) return;   // already out (or never in): one episode per stay outside
    this.joined = false;
    this.episode = [Date.now(), null, cause, this.current, 0, 0];
    this.episodes.push(this.episode);
  }

  onBroadcast(p) {
    if (!p || p.topic !== this.topic) { this.misrouted++; return; }
    if (this.seen.has(p.n)) { this.dups.push([Date.now(), p.n]); return; }
    this.seen.add(p.n);
    this.recv.push(p.n);
  }

  ping() {
    const i = this.pingT.length;
    this.pingT.push(Date.now());
    this.pingO.push(PENDING);
    this.pingDone.push(0);
    this.pending++;
    let push;
    try {
      push = this.chan.push("ping", { c: this.id, i }, cfg.push_timeout_ms);
    } catch (e) {
      this.settle(i, THREW, String(e && e.message));
      return;
    }
    push.receive("ok", (r) => {
      if (!r || r.c !== this.id || r.i !== i) this.wrongReplies++;
      this.settle(i, OK, null);
    });
    push.receive("error", (r) => this.settle(i, ERROR, r && r.reason));
    push.receive("timeout", () => this.settle(i, TIMEOUT, null));
  }

  settle(i, outcome, reason) {
    if (this.pingO[i] !== PENDING) { this.doubleOutcomes++; return; }
    this.pingO[i] = outcome;
    this.pingDone[i] = Date.now();
    this.pending--;
    if (outcome === ERROR || outcome === THREW) note(this.errorReasons, reason);
  }

  startPings() {
    if (this.timer) return;
    // Spread the clients over the interval, so the pings do not come in bursts.
    setTimeout(() => {
      if (this.stopped) return;
      this.ping();
      this.timer = setInterval(() => this.ping(), cfg.ping_ms);
    }, Math.random() * cfg.ping_ms);
  }

  stopPings() {
    this.stopped = true;
    clearInterval(this.timer);
  }

  report() {
    return {
      id: this.id, home: this.home, topic: this.topic, joined: this.joined, first_join: this.firstJoin,
      attempts: this.attempts, opens: this.opens, closes: this.closes, episodes: this.episodes,
      join_errors: this.joinErrors, join_timeouts: this.joinTimeouts, phx_closes: this.phxCloses,
      ping_t: this.pingT, ping_o: this.pingO, ping_done: this.pingDone, ping_error_reasons: this.errorReasons,
      wrong_replies: this.wrongReplies, double_outcomes: this.doubleOutcomes,
      recv: this.recv, dups: this.dups, misrouted: this.misrouted,
    };
  }
}

const clients = [];
for (let k = 0; k < cfg.clients; k++) clients.push(new ChaosClient(cfg.first + k));

// Connect gradually (a few ms apart), as the initial join is not what is measured.
clients.forEach((c, k) => setTimeout(() => c.start(), k * 5));

let readySent = false;
function checkReady() {
  if (readySent) return;
  const joined = clients.filter((c) => c.firstJoin !== null).length;
  if (joined === clients.length || Date.now() >= readyDeadline) {
    readySent = true;
    out({ type: "ready", joined, clients: clients.length });
  } else {
    setTimeout(checkReady, 50);
  }
}
const readyDeadline = Date.now() + cfg.join_deadline_ms;
checkReady();

// Bounded: never outlive the benchmark, whatever happens to it.
setTimeout(() => { process.stderr.write("chaosclient: max runtime reached, exiting\n"); process.exit(3); },
           cfg.max_runtime_s * 1000);

const commands = {
  start() { clients.forEach((c) => c.startPings()); return {}; },
  stop() { clients.forEach((c) => c.stopPings()); return {}; },
  status() {
    return {
      joined: clients.filter((c) => c.joined).length,
      pending: clients.reduce((s, c) => s + c.pending, 0),
    };
  },
  report() { return { clients: clients.map((c) => c.report()) }; },
  exit() {
    clients.forEach((c) => { c.exiting = true; c.socket.disconnect(); });
    setTimeout(() => process.exit(0), 100);
    return {};
  },
};

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  let cmd;
  try { cmd = JSON.parse(line); } catch (e) { out({ answer: null, error: "bad command line" }); return; }
  const fn = commands[cmd.cmd];
  if (!fn) { out({ answer: cmd.cmd, error: "unknown command" }); return; }
  out(Object.assign({ answer: cmd.cmd }, fn()));
}).on("close", () => process.exit(0));
