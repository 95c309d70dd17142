// The status page in headless Chromium: it must list the cluster's edges and workers, then,
// after the test kills a worker, drop it, show the restart and list the replacement.
// Protocol on stdin/stdout, one JSON line each way:
//   -> {"shown": {edges, workers, topics, cards}}           once the page lists everything
//   <- {"killed": PID}                                        after the test sent SIGKILL
//   -> {"after": {...}}                                       once the page has caught up
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
    const { killed } = JSON.parse((await lines.next()).value)
    input.close()
    // The killed pid must leave the table, a down event must show, and a new pid must appear.
    await page.waitForFunction(([dead, w]) => {
      const pids = [...document.querySelectorAll("#workers tr[data-worker-id]")].map(tr => Number(tr.dataset.pid))
      const downs = [...document.querySelectorAll("#events tr.down")].some(tr => tr.textContent.includes(`pid ${dead}`))
      const ups = document.querySelectorAll("#events tr.up").length > 0
      return !pids.includes(dead) && pids.length === w && downs && ups
    }, [killed, Number(nWorkers)], { timeout: 30000 })
    await page.screenshot({ path: path.join(artifacts, "status.png"), fullPage: true })
    console.log(JSON.stringify({ after: await page.evaluate(shown) }))
  } finally {
    await browser.close()
  }
})().catch(err => { console.error(err && err.stack || String(err)); process.exit(1) })
