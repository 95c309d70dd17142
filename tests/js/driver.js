#!/usr/bin/env node
// Drives the real phoenix.js client for the end-to-end tests (tests/jsclient.py is the other end).
//
// stdin:  one JSON command per line, each with an "id".
// stdout: one JSON object per line: either the answer to a command {"id", "ok", ...} (sent when
//         the command is done or failed) or an event {"type": ...} (everything the socket and its
//         channels observe). Binary payloads travel as {"binary_b64": "..."} in both directions.
//
// One driver = one phoenix Socket (reconnectable with a new "connect"). Channels are named by the
// test ("chan"), so two channel objects on one topic can coexist.
//
// Transport: WebSocket (the `ws` package) unless connect's opts say transport: "longpoll"
// (phoenix's LongPoll over Node's fetch); longPollFallbackMs passes through to phoenix. LongPoll
// POSTs show up as {"type":"lp_post","lines":N,"status":S} events, and GETs answered with anything
// but 200/204 as {"type":"lp_poll","status":S}.
"use strict";

const readline = require("readline");
const path = require("path");
const WebSocket = require("ws");
const { Socket, LongPoll, Presence } = require(path.join(__dirname, "..", "..", "node_modules", "phoenix"));
const ZchannelsRecovery = require(path.join(__dirname, "..", "..", "edge", "static_recovery", "zchannels-recovery.js"));

let socket = null;
const channels = new Map(); // chan name -> Channel
let frames = false;

function send(obj) {
  let line;
  try {
    line = JSON.stringify(obj);
  } catch (e) {
    line = JSON.stringify({ type: "driver_error", error: "unserialisable output: " + e.message });
  }
  process.stdout.write(line + "\n");
}

function emit(ev) {
  ev.t = Date.now();
  send(ev);
}

// ArrayBuffer / typed arrays -> {"binary_b64"}, recursively (responses may nest them). The depth
// cap keeps circular objects (e.g. logger data holding a WebSocket) from looping.
function toJson(value, depth = 0) {
  if (depth > 8) return "[too deep]";
  if (value instanceof ArrayBuffer) {
    return { binary_b64: Buffer.from(value).toString("base64") };
  }
  if (ArrayBuffer.isView(value)) {
    return { binary_b64: Buffer.from(value.buffer, value.byteOffset, value.byteLength).toString("base64") };
  }
  if (Array.isArray(value)) return value.map((v) => toJson(v, depth + 1));
  if (value && typeof value === "object") {
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = toJson(v, depth + 1);
    return out;
  }
  return value;
}

function toArrayBuffer(b64) {
  const buf = Buffer.from(b64, "base64");
  // phoenix.js sends binary only for payload.constructor === ArrayBuffer: make a fresh, exact one.
  const ab = new ArrayBuffer(buf.length);
  new Uint8Array(ab).set(buf);
  return ab;
}

// Numbers or lists from JSON become the backoff functions phoenix.js expects.
function backoff(spec) {
  if (typeof spec === "number") return () => spec;
  if (Array.isArray(spec)) return (tries) => spec[Math.min(tries, spec.length) - 1];
  throw new Error("backoff option must be a number or a list of numbers, got " + JSON.stringify(spec));
}

function requireChan(name) {
  const chan = channels.get(name);
  if (!chan) throw new Error("unknown chan " + JSON.stringify(name));
  return chan;
}

function requireSocket() {
  if (!socket) throw new Error("not connected: send a connect command first");
  return socket;
}

const commands = {
  connect(cmd) {
    if (socket) {
      socket.disconnect();
      channels.clear();
    }
    const opts = Object.assign({}, cmd.opts || {});
    frames = !!opts.frames;
    delete opts.frames;
    const log = !!opts.log;
    delete opts.log;
    const waitOpen = opts.wait !== false;
    delete opts.wait;
    if (cmd.params !== undefined) opts.params = cmd.params;
    if (cmd.vsn !== undefined) opts.vsn = cmd.vsn;
    if (cmd.timeout !== undefined) opts.timeout = cmd.timeout;
    for (const key of ["rejoinAfterMs", "reconnectAfterMs"]) {
      if (opts[key] !== undefined) opts[key] = backoff(opts[key]);
    }
    if (log) opts.logger = (kind, msg, data) => emit({ type: "log", kind, msg, data: toJson(data) });
    const transport = opts.transport === undefined ? "websocket" : opts.transport;
    if (transport !== "websocket" && transport !== "longpoll") {
      throw new Error("transport must be \"websocket\" or \"longpoll\", got " + JSON.stringify(transport));
    }
    opts.transport = transport === "longpoll" ? LongPoll : WebSocket;

    const s = new Socket(cmd.url, opts);
    socket = s;
    const origDecode = s.decode;
    s.decode = (raw, callback) => {
      if (frames) emit({ type: "frame", dir: "in", data: toJson(raw) });
      try {
        origDecode(raw, callback);
      } catch (e) {
        emit({ type: "driver_error", where: "decode", error: String(e && e.stack || e) });
      }
    };
    const origEncode = s.encode;
    s.encode = (msg, callback) => origEncode(msg, (out) => {
      if (frames) emit({ type: "frame", dir: "out", data: toJson(out) });
      callback(out);
    });

    let answered = !waitOpen;
    const answer = (status, extra) => {
      if (answered || socket !== s) return;
      answered = true;
      send(Object.assign({ id: cmd.id, ok: true, status }, extra || {}));
    };
    s.onOpen(() => {
      if (socket !== s) return;
      // extensions: what the WebSocket agreed (e.g. permessage-deflate), "" for none or LongPoll
      emit({ type: "socket_open", extensions: (s.conn && typeof s.conn.extensions === "string") ? s.conn.extensions : "" });
      answer("open");
    });
    s.onError((err) => {
      if (socket !== s) return;
      const message = err && (err.message || (err.error && err.error.message)) || String(err);
      emit({ type: "socket_error", message });
      answer("error", { message });
    });
    s.onClose((ev) => {
      if (socket !== s) return;
      const info = { code: ev && ev.code, reason: ev && ev.reason, wasClean: ev && ev.wasClean };
      emit(Object.assign({ type: "socket_close" }, info));
      answer("closed", info);
    });
    s.connect();
    if (!waitOpen) send({ id: cmd.id, ok: true, status: "connecting" });
  },

  join(cmd) {
    const s = requireSocket();
    const name = cmd.chan;
    if (channels.has(name)) throw new Error("chan name already used: " + name);
    // recovery: true -> the channel comes from zchannels-recovery.js (zc_since on every rejoin);
    // each zc_recovery shows up as {"type":"recovery","chan","info","position"}.
    const chan = cmd.recovery ? ZchannelsRecovery.channel(s, cmd.topic, cmd.params || {})
                              : s.channel(cmd.topic, cmd.params || {});
    channels.set(name, chan);
    if (cmd.recovery) {
      chan.onRecovery((info) => emit({ type: "recovery", chan: name, topic: cmd.topic,
                                       info: toJson(info), position: chan.position() }));
    }
    chan.onError((reason) => emit({ type: "chan_error", chan: name, topic: cmd.topic,
                                    reason: toJson(reason) }));
    chan.onClose((payload) => emit({ type: "chan_close", chan: name, topic: cmd.topic,
                                     payload: toJson(payload) }));
    for (const event of cmd.on || []) listen(name, chan, event);
    // presence: true -> a phoenix.js Presence on the channel; every onSync emits the whole list
    // as {"type":"presence_sync","chan","list":{key: [meta, ...]}}.
    if (cmd.presence) {
      const presence = new Presence(chan);
      presence.onSync(() => {
        const list = {};
        presence.list((key, { metas }) => { list[key] = toJson(metas); });
        emit({ type: "presence_sync", chan: name, list });
      });
    }
    const push = chan.join(cmd.timeout);
    let answered = false;
    if (cmd.nowait) {
      // Answer now (the join outcome still shows up as a joined/join_error/join_timeout event).
      answered = true;
      send({ id: cmd.id, ok: true, status: "sent", response: null, join_ref: chan.joinRef() });
    }
    const answer = (status, response) => {
      if (answered) return;
      answered = true;
      send({ id: cmd.id, ok: true, status, response: toJson(response), join_ref: chan.joinRef() });
    };
    // Receive hooks stay on the join push, so they fire for every automatic rejoin as well.
    push.receive("ok", (r) => {
      emit({ type: "joined", chan: name, topic: cmd.topic, response: toJson(r), join_ref: chan.joinRef() });
      answer("ok", r);
    });
    push.receive("error", (r) => {
      emit({ type: "join_error", chan: name, topic: cmd.topic, response: toJson(r) });
      answer("error", r);
    });
    push.receive("timeout", () => {
      emit({ type: "join_timeout", chan: name, topic: cmd.topic });
      answer("timeout", null);
    });
  },

  // Several pushes in one event-loop tick (LongPoll batches them into one POST); the answer
  // lists every push's reply status and response, in order.
  push_many(cmd) {
    const chan = requireChan(cmd.chan);
    const results = new Array(cmd.pushes.length).fill(null);
    let left = cmd.pushes.length;
    cmd.pushes.forEach(({ event, payload }, i) => {
      const push = chan.push(event, payload === undefined ? {} : payload, cmd.timeout);
      const origMatch = push.matchReceive.bind(push);
      push.matchReceive = (reply) => {
        origMatch(reply);
        if (results[i] !== null) return;
        results[i] = { status: reply.status, response: toJson(reply.response) };
        if (--left === 0) send({ id: cmd.id, ok: true, results });
      };
    });
  },

  // The session token of the current LongPoll transport. With "token" set, every later request
  // of this transport carries that token instead (e.g. one the server does not know, to see the
  // client recover from a gone session); each poll answer would overwrite a plain assignment.
  lp_token(cmd) {
    const conn = requireSocket().conn;
    if (!conn || !(conn instanceof LongPoll)) throw new Error("the socket is not on LongPoll");
    if (cmd.token !== undefined) {
      const forced = cmd.token;
      conn.endpointURL = function () {
        return this.pollEndpoint + (/\?/.test(this.pollEndpoint) ? "&" : "?") +
          "token=" + encodeURIComponent(forced);
      };
    }
    send({ id: cmd.id, ok: true, token: conn.token });
  },

  push(cmd) {
    const chan = requireChan(cmd.chan);
    const payload = cmd.binary !== undefined ? toArrayBuffer(cmd.binary)
                                             : (cmd.payload === undefined ? {} : cmd.payload);
    const push = chan.push(cmd.event, payload, cmd.timeout);
    let done = false;
    if (cmd.nowait) {
      // Answer now; whatever reply comes later is visible only in frames/events.
      done = true;
      send({ id: cmd.id, ok: true, status: "sent", response: null });
    }
    // Every reply status (ok, error, custom ones) and the timeout pass through matchReceive.
    const origMatch = push.matchReceive.bind(push);
    push.matchReceive = (reply) => {
      origMatch(reply);
      if (done) return;
      done = true;
      send({ id: cmd.id, ok: true, status: reply.status, response: toJson(reply.response) });
    };
  },

  on(cmd) {
    listen(cmd.chan, requireChan(cmd.chan), cmd.event);
    send({ id: cmd.id, ok: true });
  },

  leave(cmd) {
    const chan = requireChan(cmd.chan);
    const push = chan.leave(cmd.timeout);
    let done = false;
    const finish = (status) => {
      if (done) return;
      done = true;
      send({ id: cmd.id, ok: true, status });
    };
    push.receive("ok", () => finish("ok")).receive("timeout", () => finish("timeout"));
  },

  disconnect(cmd) {
    const s = requireSocket();
    s.disconnect(() => send({ id: cmd.id, ok: true }), cmd.code, cmd.reason);
  },

  raw(cmd) {
    const conn = requireSocket().conn;
    if (!conn) throw new Error("no transport");
    conn.send(cmd.binary !== undefined ? toArrayBuffer(cmd.binary) : cmd.frame);
    send({ id: cmd.id, ok: true });
  },

  ping(cmd) {
    const pushed = requireSocket().ping((rtt) => send({ id: cmd.id, ok: true, status: "ok", rtt }));
    if (!pushed) send({ id: cmd.id, ok: true, status: "not_connected" });
  },

  state(cmd) {
    const s = socket;
    const chans = {};
    for (const [name, chan] of channels) chans[name] = { state: chan.state, join_ref: chan.joinRef() };
    send({ id: cmd.id, ok: true, connection: s ? s.connectionState() : "none", channels: chans });
  },

  exit(cmd) {
    send({ id: cmd.id, ok: true });
    process.exit(0);
  },
};

function listen(name, chan, event) {
  chan.on(event, (payload, ref, joinRef) => {
    emit({ type: "message", chan: name, topic: chan.topic, event, payload: toJson(payload),
           ref: ref === undefined ? null : ref, join_ref: joinRef === undefined ? null : joinRef });
  });
}

// LongPoll requests as events (POSTs, and polls that were not plain 200/204), so tests can see
// how pushes were batched and how the client took a status.
const lpAjax = LongPoll.prototype.ajax;
LongPoll.prototype.ajax = function (method, headers, body, onCallerTimeout, callback) {
  const lines = method === "POST" ? String(body).split("\n").length : 0;
  return lpAjax.call(this, method, headers, body, onCallerTimeout, (resp) => {
    const status = resp ? resp.status : null;
    if (method === "POST") emit({ type: "lp_post", lines, status });
    else if (status !== 200 && status !== 204) emit({ type: "lp_poll", status });
    callback(resp);
  });
};

process.on("uncaughtException", (e) => emit({ type: "driver_error", where: "uncaught",
                                               error: String(e && e.stack || e) }));
process.on("unhandledRejection", (e) => emit({ type: "driver_error", where: "rejection",
                                                error: String(e && e.stack || e) }));

const rl = readline.createInterface({ input: process.stdin, terminal: false });
rl.on("line", (line) => {
  if (!line.trim()) return;
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch (e) {
    emit({ type: "driver_error", where: "parse", error: e.message, line });
    return;
  }
  const handler = commands[cmd.cmd];
  try {
    if (!handler) throw new Error("unknown command " + JSON.stringify(cmd.cmd));
    handler(cmd);
  } catch (e) {
    send({ id: cmd.id, ok: false, error: String(e && e.message || e) });
  }
});
rl.on("close", () => {
  if (socket) socket.disconnect();
  process.exit(0);
});
send({ type: "driver_ready", t: Date.now() });
