// Load for the status page's browser test: N phoenix.js clients (WebSocket, spread round-robin
// over the given socket URLs) join one echo topic of tests/apps/e2e_app.py, and each pushes
// "bcast" every PERIOD_MS, so the edges count joins, frames in, replies out and fast-lane
// deliveries (every push is broadcast to all N).
// stdout, one JSON line each: {"joined": N} once every client has joined; {"stopped": {pushed,
// ok, failed}} once stdin has closed and every socket is closed (then exit 0).
// Usage: node status_load.js N PERIOD_MS TOPIC WS_URL [WS_URL...]
"use strict";

const path = require("path")
const WebSocket = require("ws")
const { Socket } = require(path.join(__dirname, "..", "..", "node_modules", "phoenix"))

const [n, periodMs, topic, ...urls] = process.argv.slice(2)
if (!(Number(n) > 0) || !(Number(periodMs) > 0) || !topic || !urls.length) {
  console.error("usage: node status_load.js N PERIOD_MS TOPIC WS_URL [WS_URL...]")
  process.exit(2)
}
const counts = { pushed: 0, ok: 0, failed: 0 }
const clients = []

function start(i) {
  const socket = new Socket(urls[i % urls.length], { transport: WebSocket, params: { user: `load${i}` } })
  socket.connect()
  const channel = socket.channel(topic, {})
  const joined = new Promise((resolve, reject) => {
    channel.join().receive("ok", resolve).receive("error", r => reject(new Error(`join: ${JSON.stringify(r)}`)))
      .receive("timeout", () => reject(new Error("join timed out")))
  })
  const timer = setInterval(() => {
    if (channel.state !== "joined") return
    counts.pushed += 1
    channel.push("bcast", { from: i, n: counts.pushed })
      .receive("ok", () => { counts.ok += 1 })
      .receive("error", () => { counts.failed += 1 })
      .receive("timeout", () => { counts.failed += 1 })
  }, Number(periodMs))
  clients.push({ socket, timer })
  return joined
}

;(async () => {
  await Promise.all(Array.from({ length: Number(n) }, (_, i) => start(i)))
  console.log(JSON.stringify({ joined: clients.length }))
  process.stdin.resume()
  await new Promise(resolve => process.stdin.on("end", resolve))
  for (const { timer } of clients) clearInterval(timer)
  await Promise.all(clients.map(({ socket }) => new Promise(resolve => socket.disconnect(resolve))))
  console.log(JSON.stringify({ stopped: counts }))
  process.exit(0)
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
