// The status page in headless Chromium: it must list the cluster's edges and workers, chart
// the load the test runs, then, after the test kills a worker, drop it, show the restart (in
// the table and the restarts chart) and list the replacement.
// Protocol on stdin/stdout, one JSON line each way:
//   -> {"shown": {edges, workers, topics, cards}}           once the page lists everything
//   <- {"load": N}                                            once N load clients have joined
//   -> {"charts": [BEFORE, LATER]}                            the charts' data (charts()) once
//                                                             they show the load, and 5 samples later
//   <- {"killed": PID}                                        after the test sent SIGKILL
//   -> {"after": {..., charts}}                               once the page has caught up
// Usage: node browser_status.js http://127.0.0.1:PORT ARTIFACT_DIR N_EDGES N_WORKERS STATUS_TOKEN
const path = require("path")
const readline = require("readline")
const { chromium } = require(path.join(__dirname, "..", "..", "node_modules", "playwright-core"))

const [base, artifacts, nEdges, nWorkers, token] = process.argv.slice(2)
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium"
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"]

const input = readline.createInterface({ input: process.stdin })
const lines = input[Symbol.asyncIterator]()

function shown() {   // runs in the page: what the tables show
  const rows = sel => [...document.querySelectorAll(sel)].map(tr => ({ ...tr.dataset, text: tr.textContent }))
  return {
    conn: document.getElementById("conn").textContent,
    edges: rows("#edges tr[data-edge-id]"),
    workers: rows("#workers tr[data-worker-id]"),
    topics: rows("#topics tr[data-topic]"),
    events: [...document.querySelectorAll("#events tr.down, #events tr.up")].map(tr => tr.textContent),
    cards: Object.fromEntries([...document.querySelectorAll("[data-card]")].map(
      d => [d.dataset.card, d.querySelector("b").textContent])),
  }
}

function charts() {   // runs in the page: the charts' history (window.statusHistory) and drawing
  const h = window.statusHistory
  const series = {}
  for (const key of ["t", "connections", "joins", "frames_in", "frames_out", "deliveries"])
    series[key] = h.points.map(p => p[key])
  return {
    series, restarts: h.restarts,
    drawn: Object.fromEntries([...document.querySelectorAll("[data-chart]")].map(
      d => [d.dataset.chart, Number(d.querySelector("svg").dataset.points)])),
    legend: Object.fromEntries([...document.querySelectorAll("[data-chart] .legend[data-series]")].map(
      s => [s.dataset.series, Number(s.dataset.latest)])),
  }
}

;(async () => {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ARGS })
  try {
    const page = await (await browser.newContext({ viewport: { width: 1280, height: 900 } })).newPage()
    page.on("pageerror", err => console.error("page error:", err.message))
    await page.goto(`${base}/status?status_token=${encodeURIComponent(token)}`)
    await page.waitForFunction(([e, w]) =>
      document.querySelectorAll("#edges tr[data-edge-id]").length === e &&
      document.querySelectorAll("#workers tr[data-worker-id]").length === w,
      [Number(nEdges), Number(nWorkers)], { timeout: 15000 })
    console.log(JSON.stringify({ shown: await page.evaluate(shown) }))

    // The load shows: the connections reach the load's clients plus this page, joins and
    // messages have rates, and the latest sample still carries messages.
    const { load } = JSON.parse((await lines.next()).value)
    await page.waitForFunction(n => {
      const pts = window.statusHistory.points, last = pts[pts.length - 1]
      return last && last.connections >= n + 1 && last.frames_in > 0 && last.deliveries > 0 &&
        pts.some(p => p.joins > 0)
    }, Number(load), { timeout: 20000 })
    const before = await page.evaluate(charts)
    const t0 = before.series.t[before.series.t.length - 1]
    await page.waitForFunction(t => window.statusHistory.points.filter(p => p.t > t).length >= 5, t0,
                               { timeout: 10000 })
    console.log(JSON.stringify({ charts: [before, await page.evaluate(charts)] }))

    const { killed } = JSON.parse((await lines.next()).value)
    input.close()
    // The killed pid must leave the table, a down event must show, and a new pid must appear.
    await page.waitForFunction(([dead, w]) => {
      const pids = [...document.querySelectorAll("#workers tr[data-worker-id]")].map(tr => Number(tr.dataset.pid))
      const downs = [...document.querySelectorAll("#events tr.down")].some(tr => tr.textContent.includes(`pid ${dead}`))
      const ups = document.querySelectorAll("#events tr.up").length > 0
      // ... and the restarts chart has drawn a bar for each.
      const bars = Number(document.querySelector("[data-chart=restarts] svg").dataset.points)
      return !pids.includes(dead) && pids.length === w && downs && ups && bars >= 2
    }, [killed, Number(nWorkers)], { timeout: 30000 })
    await page.screenshot({ path: path.join(artifacts, "status.png"), fullPage: true })
    console.log(JSON.stringify({ after: { ...await page.evaluate(shown), charts: await page.evaluate(charts) } }))
  } finally {
    await browser.close()
  }
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
